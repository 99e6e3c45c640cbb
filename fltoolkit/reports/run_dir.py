"""RunDirectory: where one run writes its resolved config, metric history and summary.

An existing, non-empty run directory is never reused silently: a second run into it fails
with the path named, so a finished experiment is not overwritten by a typo.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

METRIC_COLUMNS = ["round", "wall_time_s", "auc", "logloss", "ne", "gauc", "calibration"]


class RunDirectoryError(ValueError):
    """The run directory cannot be used (exists and is not empty)."""


def next_version(root: Path) -> Path:
    """`root/version_N` with N one past the highest existing version."""
    versions = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*")
                if p.name.split("_", 1)[1].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


class RunDirectory:
    """Files of one run: config.yaml, metrics.csv (a row per evaluation) and summary.json."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirectoryError(
                f"run_dir {self.path} already exists and is not empty; "
                "choose another --run_dir (runs are never overwritten)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.csv"
        self._columns: list[str] | None = None

    def write_config(self, text: str) -> None:
        _atomic_write(self.path / "config.yaml", text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one evaluation; the first row fixes the columns (known ones first)."""
        if self._columns is None:
            extra = [k for k in row if k not in METRIC_COLUMNS]
            self._columns = [c for c in METRIC_COLUMNS if c in row] + extra
            with self.metrics_path.open("w", newline="") as f:
                csv.writer(f).writerow(self._columns)
        with self.metrics_path.open("a", newline="") as f:
            csv.writer(f).writerow([_format(row.get(c)) for c in self._columns])

    def write_summary(self, summary: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in summary.items()}
        _atomic_write(self.path / "summary.json", json.dumps(clean, indent=2) + "\n")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
