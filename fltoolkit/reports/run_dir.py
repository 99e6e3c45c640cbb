"""RunDirectory: where one run writes its resolved config, metric history, TensorBoard events,
per-client table, final model and summary (plots and reports: `fltoolkit/reports/build.py`).

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

import polars as pl
import torch

from fltoolkit.reports.tensorboard import TensorBoardLog

METRIC_COLUMNS = ("round", "wall_time_s", "auc", "logloss", "ne", "gauc", "calibration")


def save_atomically(path: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp file, flushed to disk, then renamed over `path`: a crash
    mid-write leaves the previous file intact (checkpoints, final.pt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path



class RunDirectoryError(ValueError):
    """The run directory cannot be used (exists and is not empty)."""


def _versions(root: Path) -> dict[int, Path]:
    return {int(p.name.split("_", 1)[1]): p for p in root.glob("version_*")
            if p.name.split("_", 1)[1].isdigit()}


def next_version(root: Path) -> Path:
    """`root/version_N` with N one past the highest existing version."""
    return root / f"version_{max(_versions(root), default=-1) + 1}"


def latest_version(root: Path) -> Path | None:
    """The highest `root/version_N`, or None."""
    versions = _versions(root)
    return versions[max(versions)] if versions else None


class CsvLog:
    """A CSV file written a row at a time; the first row fixes the columns (`first` ones
    leading)."""

    def __init__(self, path: Path, first: tuple[str, ...] = ()) -> None:
        self.path, self.first = path, first
        self.columns: list[str] | None = None

    def truncate_after(self, round_index: int) -> None:
        """Keep the header and the rows up to `round_index` (a resumed run rewrites the rest).

        A row cut short by a kill (fewer fields than the header) is dropped whatever round it
        seems to name: "1" may be the start of "12,...".
        """
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            kept = [row for row in reader if header and len(row) == len(header)
                    and int(row[0]) <= round_index]
        if header is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([header, *kept])
        os.replace(tmp, self.path)
        self.columns = header

    def append(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = ([c for c in self.first if c in row]
                            + [k for k in row if k not in self.first])
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_format(row.get(c)) for c in self.columns])


class RunDirectory:
    """Files of one run: config.yaml, metrics.csv (a row per evaluation), rounds.csv (a row
    per federated round), clients.csv (a row per training client, rewritten at each
    evaluation), tensorboard/, checkpoints/final.pt (the server's model) and summary.json."""

    def __init__(self, path: str | Path, resume_after: int | None = None) -> None:
        """A new run directory, or with `resume_after` an existing one whose rows after that
        round are dropped (the resumed run writes them again)."""
        self.path = Path(path)
        if resume_after is None and self.path.exists() and any(self.path.iterdir()):
            raise RunDirectoryError(
                f"run_dir {self.path} already exists and is not empty; "
                "choose another --run_dir (runs are never overwritten) or --resume it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)
        self.metrics = CsvLog(self.path / "metrics.csv", METRIC_COLUMNS)
        self.rounds = CsvLog(self.path / "rounds.csv", ("round",))
        if resume_after is not None:
            self.metrics.truncate_after(resume_after)
            self.rounds.truncate_after(resume_after)
            (self.path / "summary.json").unlink(missing_ok=True)
        self.tensorboard = TensorBoardLog(
            self.path / "tensorboard", None if resume_after is None else resume_after + 1)

    def write_config(self, text: str) -> None:
        _atomic_write(self.path / "config.yaml", text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one evaluation (known metric columns first)."""
        self.metrics.append(row)
        self.tensorboard.evaluation(row)

    def append_round(self, row: dict[str, Any]) -> None:
        """Append one federated round's bookkeeping (clients, bytes, simulated time)."""
        self.rounds.append(row)
        self.tensorboard.round(row)

    def write_clients(self, clients: pl.DataFrame) -> None:
        """Replace clients.csv (atomically: an interrupted run keeps the previous one)."""
        tmp = self.path / ".clients.csv.tmp"
        clients.write_csv(tmp)
        os.replace(tmp, self.path / "clients.csv")

    def save_model(self, state: dict[str, torch.Tensor]) -> Path:
        """checkpoints/final.pt: tensors only, so `torch.load(weights_only=True)` reads it."""
        return save_atomically(self.checkpoints / "final.pt", state)

    def close(self) -> None:
        self.tensorboard.close()

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
