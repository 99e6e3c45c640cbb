"""The experiment parser: LightningCLI over the experiment YAML, and its error messages.

The experiment YAML is the serialization of the datamodule's and the module's constructor
signatures (class_path + init_args) plus fltk's own typed sections, so an unknown key or a
wrong type fails with its name before any work starts. Kept apart from `cli.py` because
importing Lightning, TorchRec and torch takes seconds that `fltk report` does not need.
"""

from __future__ import annotations

import re
from argparse import ArgumentError
from importlib.resources import as_file
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import experiments
from datamodules.base import CTRDataModule, DataError
from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.privacy.config import PrivacyConfig
from fltoolkit.reports.config import ReportConfig
from fltoolkit.reports.run_dir import RunDirectoryError
from fltoolkit.run.centralized import CentralizedConfig
from fltoolkit.run.checkpointing import CheckpointError, RunInterrupted
from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.systems.config import SystemsConfig
from fltoolkit.systems.devices import DeviceError
from recsys.module import CTRModule

# one per nesting level of jsonargparse's errors: the parts of the dotted key
PARSER_KEY = r'Parser key "([^"]+)"'
# user errors: reported as one line, never as a traceback
FIT_ERRORS = (ConfigError, DataError, DeviceError, RunDirectoryError, CheckpointError,
              RunInterrupted, FloatingPointError)

TRAINER_DEFAULTS = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "max_epochs": 3,
    "accelerator": "cpu",
    "devices": 1,
}


class ExperimentFile(ActionConfigFile):
    """`--experiment`: a YAML file, or else the name of a built-in experiment (`taobao`,
    `taobao.yaml`), so that the documented usage runs from any folder and any install."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None
                 ) -> None:
        if Path(values).is_file() or _is_inline_config(values):
            super().__call__(parser, cfg, values, option_string)
            return
        built_in = experiments.find(values)
        if built_in is None:
            raise ConfigError(f"experiment: no file or built-in experiment named {values!r}; "
                              f"built-in: {', '.join(experiments.names())}")
        with as_file(built_in) as path:
            super().__call__(parser, cfg, str(path), option_string)


def _is_inline_config(value: str) -> bool:
    """`--experiment '{seed: 1}'`: jsonargparse also reads YAML given inline."""
    try:
        return isinstance(yaml.safe_load(value), dict)
    except yaml.YAMLError:
        return False


class FltkCLI(LightningCLI):
    """LightningCLI with `--experiment` as the config file and fltk's own sections."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(
            model_class=CTRModule,
            datamodule_class=CTRDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            run=False,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "fltk fit", "default_env": False, "exit_on_error": False},
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = self.parser_class(**kwargs)
        parser.add_argument("--experiment", "-c", "--config", action=ExperimentFile,
                            help="Experiment YAML (the config file; later options override it): "
                                 "a path, or the name of a built-in one: "
                                 f"{', '.join(experiments.names())} (`fltk experiments` "
                                 "describes them).")
        return parser

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--seed", type=int, default=0,
                            help="One seed for data generation, batch order and initialization.")
        parser.add_argument("--num_threads", type=int, default=1,
                            help="torch intra-op threads. CTR batches are small: a second thread "
                                 "gains little and OpenMP spin-waits collapse when cores are "
                                 "shared.")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run directory (default runs/<experiment>/version_N); "
                                 "must not exist or be empty.")
        parser.add_argument("--resume", type=str | None, default=None,
                            help="Continue a stopped federated run from its newest checkpoint: "
                                 "its run directory, or `last` (the newest of the experiment). "
                                 "The configuration must be the run's own.")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(FederatedConfig, "federated")
        parser.add_class_arguments(SystemsConfig, "systems")
        parser.add_class_arguments(PrivacyConfig, "privacy")
        parser.add_class_arguments(EmbeddingBudgetConfig, "embeddings")
        parser.add_class_arguments(ReportConfig, "report")
        parser.add_class_arguments(CentralizedConfig, "centralized")
        parser.link_arguments("seed", "data.init_args.seed")

    def instantiate_classes(self) -> None:
        """Constructors validate their arguments; report their ValueErrors as config errors."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            raise ConfigError(constructor_error(str(error))) from error

    def _set_seed(self) -> None:
        import torch
        from lightning.pytorch import seed_everything

        torch.set_num_threads(self.config["num_threads"])
        seed_everything(self.config["seed"], workers=True, verbose=False)


def condense_parse_error(message: str) -> str:
    """jsonargparse's nested, multi-line parse errors as one line naming the dotted key."""
    refused = _wrong_choice(message) or _abstract_class(message)
    if refused:
        return refused
    keys = re.findall(PARSER_KEY, message)
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown:
        owner = re.search(r"given class_path '([^']+)'", message)
        where = f" (not an argument of {owner.group(1)})" if owner else ""
        return f"unknown key {'.'.join([*keys, unknown.group(1)])}{where}"
    group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message)
    if group:  # a misspelled key inside the experiment YAML
        return f"unknown key {group.group(1)}.{group.group(2)}"
    unrecognized = re.match(r"unrecognized arguments: --(\S+)", message)
    if unrecognized:
        return f"unknown key {unrecognized.group(1)}"
    expected = re.search(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", message)
    if expected and keys:
        return f"{'.'.join(keys)}: expected {expected.group(1)}, got {expected.group(2)}"
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip()) for line in message.splitlines()]
    reasons = [line for line in lines if line]
    if keys and reasons:
        return f"{'.'.join(keys)}: {reasons[0]}"
    return reasons[0] if reasons else message


def _wrong_choice(message: str) -> str | None:
    """A value outside a Literal: the key, the value and the allowed values. The key leaves out
    `init_args` (as jsonargparse's own messages do); the command line takes it either way."""
    choice = re.search(r"Expected a (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)", message)
    if choice is None:
        return None
    key = _key_enclosing(message, choice.start())
    return f"{key}: {choice.group(2)!r} is not one of {choice.group(1)}" if key else None


def _abstract_class(message: str) -> str | None:
    """An abstract class chosen by class_path (e.g. FedOpt), which no run can instantiate."""
    abstract = re.search(r"Expected an instantiatable class, but ([\w.]+) is abstract", message)
    if abstract is None:
        return None
    key = _key_enclosing(message, abstract.start())
    return (f"{key}.class_path: expected an instantiatable class, but {abstract.group(1)} is "
            "abstract") if key else None


def _key_enclosing(message: str, position: int) -> str:
    """The dotted key of the reason at `position`: the 'Parser key' lines above it."""
    return ".".join(re.findall(PARSER_KEY, message[:position]))


def constructor_error(message: str) -> str:
    """The constructor's own message out of jsonargparse's 'does not validate' report."""
    reasons = [line.strip()[2:] for line in message.splitlines()
               if line.strip().startswith("- ") and "NoneType" not in line]
    return reasons[0] if reasons else message.splitlines()[0]


def experiment_name(config: Any) -> str:
    """The run's name under runs/: the experiment file's stem."""
    given = config.get("experiment") or config.get("config")
    return Path(str(given[0])).stem if given else "experiment"


def error_message(error: Exception) -> str:
    """The one line shown for a user error of `fltk fit`."""
    if isinstance(error, ArgumentError):
        return condense_parse_error(str(error))
    return str(error)
