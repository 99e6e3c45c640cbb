"""`fltk fit --resume RUN_DIR|last`: find the run, check it is the same experiment, and stop
cleanly on SIGINT/SIGTERM so that a killed job can be continued.

A resumed run must end with the same files as an uninterrupted one, so resuming with a
different configuration is refused (the differing keys are named) rather than mixed.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fltoolkit.config import ConfigError
from fltoolkit.reports.run_dir import latest_version

log = logging.getLogger("fltk")

# keys that may differ between the killed run and its resumption
RUN_KEYS = ("run_dir", "resume")


def resume_directory(resume: str, experiment_name: str) -> Path:
    """The run directory `--resume` names: a path, or `last` (the newest version of the
    experiment under runs/)."""
    if resume == "last":
        path = latest_version(Path("runs") / experiment_name)
        if path is None:
            raise ConfigError(f"--resume last: no run of {experiment_name!r} under runs/")
        return path
    path = Path(resume)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--resume {resume}: not a run directory (no config.yaml)")
    return path


def check_same_experiment(run_dir: Path, resolved_yaml: str) -> None:
    """Refuse to resume with a configuration other than the run's own."""
    stored = _flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    current = _flatten(yaml.safe_load(resolved_yaml) or {})
    differing = sorted(key for key in stored.keys() | current.keys()
                       if key.split(".")[0] not in RUN_KEYS
                       and stored.get(key) != current.get(key))
    if differing:
        shown = ", ".join(f"{key} ({stored.get(key)!r} -> {current.get(key)!r})"
                          for key in differing[:5])
        raise ConfigError(f"--resume {run_dir}: the configuration differs from the run's "
                          f"config.yaml: {shown}")


@contextmanager
def stop_on_signals(request_stop: Any) -> Iterator[None]:
    """While training, SIGINT/SIGTERM call `request_stop()` (the loop checkpoints after the
    current round and stops); a second signal interrupts at once."""
    previous = {}

    def handler(number: int, frame: Any) -> None:
        log.warning("%s: stopping after this round (a checkpoint will be written); "
                    "send it again to stop at once", signal.Signals(number).name)
        request_stop()
        for restored, old in previous.items():
            signal.signal(restored, old)

    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}
