"""Plots and report documents from run directories: the end of `fltk fit` and `fltk report`.

Both go through the files a run left behind (`RunRecord`), so regenerating a report later,
or reporting an interrupted run, gives what the run itself would have written.
"""

from __future__ import annotations

from pathlib import Path

from fltoolkit.reports.document import write_comparison, write_run_report
from fltoolkit.reports.plots import write_comparison_plots, write_run_plots
from fltoolkit.reports.record import RunRecord


def build_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """(Re)write `plots/`, `report.md` and `report.html` of one run directory."""
    record = RunRecord.load(run_dir)
    plots = write_run_plots(record, record.path / "plots")
    return write_run_report(record, plots)


def build_comparison(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """`comparison.md` / `comparison.html` and overlaid plots of several runs in `out_dir`."""
    records = [RunRecord.load(path) for path in run_dirs]
    out = Path(out_dir)
    plots = write_comparison_plots(records, out / "plots")
    return write_comparison(records, plots, out)
