"""`fltk`: the command line. `fltk fit --experiment X [--key.sub value ...]` trains (see
`fltoolkit.run.fit`); `fltk report RUN_DIR ...` rebuilds reports; `fltk experiments` lists the
built-in experiments; `fltk privacy` prints a DP-FedAvg privacy budget. Each command imports
what it needs only when run, so `fltk report`, `fltk experiments`, `fltk privacy` and
`fltk help` do not pay for torch and Lightning.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fltk")

USAGE = """usage: fltk COMMAND [options]

commands:
  fit          train a model (federated or centralized) as an experiment YAML describes
               e.g. fltk fit --experiment taobao --model.embedding_dim 32
               (--experiment takes a path, or the name of a built-in experiment)
  experiments  list the built-in experiments
  report       regenerate a run's plots and report: fltk report RUN_DIR
               compare runs: fltk report RUN_DIR RUN_DIR [...] --out DIR
  privacy      client-level DP-FedAvg without training: the noise multiplier a target epsilon
               needs, or the epsilon a noise multiplier spends; `fltk privacy --help`
               e.g. fltk privacy --target-epsilon 8 --rounds 1000 --clients-per-round 20
                    --num-clients 10000
  help         this message; `fltk fit --help` lists every option of an experiment
"""


class UsageError(ValueError):
    """A command line that cannot work (e.g. several runs to compare and no --out)."""


def _configure_logging() -> None:
    """Called after the command's imports: importing Lightning sets its loggers' levels,
    which this overrides."""
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=False)
    # fbgemm logs every kernel library it loads at INFO on the root logger
    handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[handler], force=True)
    # torchrec: its planner logs a statistics table per rank
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.distributed",
                  "torchrec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torchrec trips torch.fx's deprecation notice about is_fx_tracing on every run
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for message in ("is_fx_tracing", "does not have many workers", "LightningCLI's args",
                    "isinstance.treespec, LeafSpec", "deprecated in v4.49.0"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")


def report(args: list[str]) -> Path:
    """`fltk report`: one run's report, or a comparison of several in --out."""
    from fltoolkit.reports.build import build_comparison, build_run_report

    parser = argparse.ArgumentParser(prog="fltk report", exit_on_error=False,
                                     description="Plots and report.md/report.html of runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="comparison directory (required with several runs)")
    options = parser.parse_args(args)
    if len(options.run_dirs) == 1 and options.out is None:
        _, html = build_run_report(options.run_dirs[0])
    elif options.out is None:
        raise UsageError("comparing several runs needs --out DIR")
    else:
        _, html = build_comparison(options.run_dirs, options.out)
    log.info("report: %s", html)
    return html


class _OneLineParser(argparse.ArgumentParser):
    """Reports what argparse exits on (a missing or unknown option) as a UsageError, which
    `_run` prints as one line, instead of the usage and the message."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def _checked(kind: Callable[[str], Any], holds: Callable[[Any], bool], expected: str
             ) -> Callable[[str], Any]:
    """An argparse type: `kind` of the text, refused with `expected` unless `holds`, so that
    the one-line error names the option."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not holds(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


def privacy(args: list[str]) -> str:
    """`fltk privacy`: the noise multiplier for a target epsilon (rounded up, so the printed
    value itself keeps the target), or the epsilon of a noise multiplier, after the rounds."""
    from fltoolkit.privacy.accountant import (
        ClientSampling,
        PrivacyAccountant,
        default_delta,
        noise_multiplier_for,
    )

    positive = _checked(float, lambda x: 0 < x < math.inf, "a number > 0")
    count = _checked(int, lambda n: n >= 1, "an integer >= 1")
    parser = _OneLineParser(prog="fltk privacy", exit_on_error=False,
                            description="The privacy budget of client-level DP-FedAvg, whose "
                                        "noise has standard deviation noise multiplier x clip "
                                        "norm. fixed_size sampling is accounted for datasets "
                                        "that differ by replacing one client's data, poisson "
                                        "for adding or removing one.")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--target-epsilon", type=positive,
                        help="print the least noise multiplier that keeps epsilon <= this")
    budget.add_argument("--noise-multiplier", type=positive,
                        help="print the epsilon this noise multiplier spends")
    parser.add_argument("--rounds", type=count, required=True, help="federated rounds")
    parser.add_argument("--clients-per-round", type=count, required=True,
                        help="the cohort (its expected size with poisson sampling)")
    parser.add_argument("--num-clients", type=count, required=True, help="the population")
    parser.add_argument("--sampling", choices=["fixed_size", "poisson"], default="fixed_size",
                        help="fixed_size: the cohort drawn without replacement, as "
                             "UniformSelector does (default); poisson: each client joins "
                             "independently")
    parser.add_argument("--delta", type=_checked(float, lambda x: 0 < x < 1, "a number in (0, 1)"),
                        help="default: 1 / --num-clients")
    parser.add_argument("--method", choices=["pld", "rdp"],
                        help="default: pld for poisson sampling, rdp for fixed_size (the only "
                             "one that accounts it)")
    options = parser.parse_args(args)
    if options.target_epsilon is None and options.noise_multiplier is None:
        raise UsageError("one of --target-epsilon and --noise-multiplier is required")
    if options.clients_per_round > options.num_clients:
        raise UsageError(f"--clients-per-round {options.clients_per_round} exceeds "
                         f"--num-clients {options.num_clients}")
    sampling = ClientSampling(options.sampling, options.num_clients, options.clients_per_round)
    delta = default_delta(options.num_clients) if options.delta is None else options.delta
    method = options.method or ("pld" if options.sampling == "poisson" else "rdp")
    noise = options.noise_multiplier
    if noise is None:
        calibrated = noise_multiplier_for(options.target_epsilon, options.rounds, sampling,
                                          delta, method)
        noise = math.ceil(calibrated * 1e4) / 1e4
    epsilon = PrivacyAccountant(noise, sampling, delta, method).epsilon(options.rounds)
    cohort = (f"{options.clients_per_round} of {options.num_clients} clients per round"
              if options.sampling == "fixed_size" else
              f"each of {options.num_clients} clients with probability {sampling.rate:.4g}")
    return (f"noise multiplier {noise:g} gives epsilon {epsilon:.4f} at delta {delta:.3g} "
            f"after {options.rounds} rounds ({cohort}, {options.sampling} sampling, {method})")


def built_in_experiments() -> str:
    """`fltk experiments`: each built-in experiment's name and what it runs."""
    import experiments

    names = experiments.names()
    width = max(map(len, names))
    return "\n".join(["built-in experiments (fltk fit --experiment NAME):",
                      *(f"  {name:<{width}}  {experiments.description(name)}" for name in names)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "experiments":
        print(built_in_experiments())
        return 0
    if command == "privacy":
        return _run(lambda: print(privacy(rest)), (argparse.ArgumentError, ValueError), str,
                    command)
    if command not in ("fit", "report"):
        print(f"fltk: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "fit":
        from fltoolkit.run.fit import fit
        from fltoolkit.run.parser import FIT_ERRORS, error_message

        _configure_logging()
        return _run(lambda: fit(None, *rest), (argparse.ArgumentError, *FIT_ERRORS), error_message,
                    command)
    from fltoolkit.reports.record import RunRecordError

    _configure_logging()
    return _run(lambda: report(rest), (argparse.ArgumentError, UsageError, RunRecordError), str,
                command)


def _run(action: Callable[[], object], user_errors: tuple[type[Exception], ...],
         message: Callable[[Exception], str], command: str) -> int:
    """Run a command; a user error becomes one line on stderr and exit code 2."""
    try:
        action()
    except user_errors as error:
        if not getattr(error, "quiet", False):
            print(f"fltk {command}: error: {message(error)}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
