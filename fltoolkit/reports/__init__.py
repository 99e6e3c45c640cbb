"""Run directories and the files a run leaves behind (config, metrics, summary)."""

from fltoolkit.reports.run_dir import RunDirectory

__all__ = ["RunDirectory"]
