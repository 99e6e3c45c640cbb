"""TensorBoard curves of a run (`tensorboard --logdir runs`), beside the CSV files.

Evaluations are logged against the round (the epoch when centralized) under `eval/`, and
again against simulated seconds under `eval_vs_sim_time/` when devices are simulated;
per-round bookkeeping (bytes, rows, clients, failed rounds, durations and, in async mode,
staleness) goes under `round/`; a scalar a row lacks (staleness in sync rounds) is skipped.
An infinite epsilon (DP without noise) is left out: a scalar curve cannot draw it.
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

EVALUATION_SCALARS = ("auc", "logloss", "ne", "gauc", "calibration", "train_loss",
                      "clients_seen", "epsilon")
ROUND_SCALARS = ("aggregated", "rejected", "dropped", "stragglers", "failed", "bytes_up",
                 "bytes_down", "rows_up", "round_duration_s", "round_wall_s",
                 "mean_staleness", "max_staleness", "dropped_stale")  # the last three: async


class TensorBoardLog:
    """Writes event files under `<run_dir>/tensorboard`."""

    def __init__(self, path: Path, purge_step: int | None = None) -> None:
        """`purge_step`: on resume, events from this step on (left by the killed run) are
        dropped by TensorBoard."""
        self.writer = SummaryWriter(log_dir=str(path), purge_step=purge_step)

    def evaluation(self, row: dict[str, Any]) -> None:
        self._scalars("eval", row, EVALUATION_SCALARS, row["round"])
        if "sim_time_s" in row:
            self._scalars("eval_vs_sim_time", row, ("auc", "logloss"), round(row["sim_time_s"]))

    def round(self, row: dict[str, Any]) -> None:
        self._scalars("round", row, ROUND_SCALARS, row["round"])

    def close(self) -> None:
        self.writer.close()

    def _scalars(self, group: str, row: dict[str, Any], keys: tuple[str, ...],
                 step: int) -> None:
        for key in keys:
            value = row.get(key)
            if isinstance(value, Real) and math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, step)
