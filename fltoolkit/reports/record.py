"""RunRecord: everything a run directory holds, read back for reports and comparisons.

Reports are built from the files alone (never from a live run), so `fltk report` gives the same
document as the end of `fltk fit`, and an interrupted run (no summary.json yet, a partial
metrics.csv) still gets a report of what exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from fltoolkit.reports.staleness import parse_staleness_counts

RUN_FILES = ("metrics.csv", "summary.json", "rounds.csv")  # any one makes a run directory


class RunRecordError(ValueError):
    """A directory that is not a run directory (none of RUN_FILES)."""


@dataclass
class RunRecord:
    """One run's files. Missing files are empty frames / dicts, never errors.

    Attributes:
        path: the run directory.
        config: config.yaml, parsed ({} if absent).
        summary: summary.json ({} while the run has not finished).
        evaluations: metrics.csv, a row per evaluation (round = epoch when centralized).
        rounds: rounds.csv, a row per federated round (empty for centralized runs).
        clients: clients.csv, a row per training client at the last evaluation (federated).
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    evaluations: pl.DataFrame = field(default_factory=pl.DataFrame)
    rounds: pl.DataFrame = field(default_factory=pl.DataFrame)
    clients: pl.DataFrame = field(default_factory=pl.DataFrame)

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        if not any((path / name).exists() for name in RUN_FILES):  # rounds.csv alone: a run
            raise RunRecordError(f"{path}: not a run directory (no {', '.join(RUN_FILES)})")
        return cls(path=path, config=_yaml(path / "config.yaml"),
                   summary=_json(path / "summary.json"),
                   evaluations=_csv(path / "metrics.csv"), rounds=_csv(path / "rounds.csv"),
                   clients=_csv(path / "clients.csv"))

    @property
    def name(self) -> str:
        """A short label: `<parent>/<dir>` (e.g. taobao/version_3)."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def finished(self) -> bool:
        return bool(self.summary)

    @property
    def federated_mode(self) -> str | None:
        """sync or async for a federated run, None for a centralized one: summary.json's, else
        (interrupted runs, runs from before summary.json said it) rounds.csv's, where only
        async rounds have staleness columns."""
        if "federated_mode" in self.summary:
            return self.summary["federated_mode"]
        if "mean_staleness" in self.rounds.columns:
            return "async"
        return "sync" if self.rounds.height or self.summary.get("mode") == "federated" else None

    def staleness_counts(self) -> dict[int, int]:
        """Buffered updates by staleness over the whole run, in increasing staleness, from
        rounds.csv's `staleness_counts` cells; {} for sync runs and async runs from before
        the column."""
        if "staleness_counts" not in self.rounds.columns:
            return {}
        totals: dict[int, int] = {}
        for cell in self.rounds["staleness_counts"].drop_nulls().cast(pl.String):
            for staleness, count in parse_staleness_counts(cell).items():
                totals[staleness] = totals.get(staleness, 0) + count
        return dict(sorted(totals.items()))

    def final(self) -> dict[str, Any]:
        """The final metrics: summary.json's, else the last evaluation's ({} if none)."""
        if self.summary:
            return self.summary
        return self.evaluations.row(-1, named=True) if self.evaluations.height else {}


def _yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # written atomically, so only a foreign file gets here
        raise RunRecordError(f"{path}: not valid JSON") from None


def _csv(path: Path) -> pl.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pl.DataFrame()
    return pl.read_csv(path, infer_schema_length=None)
