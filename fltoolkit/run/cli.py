"""`fltk`: the command line. `fltk fit --experiment X [--key.sub value ...]` trains (see
`fltoolkit.run.fit`); `fltk report RUN_DIR ...` rebuilds reports; `fltk experiments` lists the
built-in experiments. Each command imports what it needs only when run, so `fltk report`,
`fltk experiments` and `fltk help` do not pay for torch and Lightning.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fltk")

USAGE = """usage: fltk COMMAND [options]

commands:
  fit          train a model (federated or centralized) as an experiment YAML describes
               e.g. fltk fit --experiment taobao --model.embedding_dim 32
               (--experiment takes a path, or the name of a built-in experiment)
  experiments  list the built-in experiments
  report       regenerate a run's plots and report: fltk report RUN_DIR
               compare runs: fltk report RUN_DIR RUN_DIR [...] --out DIR
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
