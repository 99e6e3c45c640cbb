"""summary.json: one run's final numbers, and the log line of each evaluation."""

from __future__ import annotations

import logging
from typing import Any

import torch

from fltoolkit.reports.config import ReportConfig
from fltoolkit.reports.run_dir import RunDirectory
from fltoolkit.server.held_out import METRIC_KEYS
from recsys.sharding import ShardedTables

log = logging.getLogger("fltk")

SUMMARY_INFO_KEYS = ("num_train", "num_validation", "num_test", "num_clients",
                     "dropped_clients", "baseline_auc", "oracle_auc", "bad_rows_skipped")
# the validation protocol (fltoolkit.server.held_out): absent without a validation split
PROTOCOL_KEYS = ("evaluated_on", "validation", "best_round", "best_validation_auc",
                 "best_round_test")
FEDERATED_KEYS = ("clients_seen", "bytes_up_total", "bytes_down_total", "bytes_up_per_round",
                  "bytes_down_per_round", "rejected_total", "sim_time_s",
                  "stopped_early")  # only when privacy.target_epsilon ended the run


def summary(experiment: str, mode: dict[str, Any], final: dict[str, Any],
            info: dict[str, Any], report: ReportConfig, model: torch.nn.Module,
            sharded: ShardedTables | None, wall_time_s: float) -> dict[str, Any]:
    """The run's summary: how it ran (`mode`), the final model's test metrics (and, with a
    validation split, its validation metrics and the best validation round's test metrics),
    federated totals, facts of the data, the known baselines, the model's size and the wall
    time."""
    return {
        "experiment": experiment,
        **mode,
        **{k: final[k] for k in METRIC_KEYS},
        "evaluated_on": "test",
        **{k: final[k] for k in PROTOCOL_KEYS if k in final},
        **{k: final[k] for k in FEDERATED_KEYS if k in final},
        **{k: info[k] for k in SUMMARY_INFO_KEYS if k in info},
        **report.known_baselines(),
        "model_parameters": sum(p.numel() for p in model.parameters())
        + (sharded.num_parameters() if sharded else 0),  # the module holds placeholders
        "wall_time_s": round(wall_time_s, 3),
    }


def log_evaluation(run_dir: RunDirectory, row: dict[str, Any]) -> None:
    """One evaluation: a metrics.csv row and a log line (round = epoch when centralized)."""
    run_dir.append_metrics(row)
    seen = f" clients_seen {row['clients_seen']}" if "clients_seen" in row else ""
    simulated = f" sim_time {row['sim_time_s']:.0f} s" if "sim_time_s" in row else ""
    log.info("round %d: auc %.4f logloss %.4f gauc %.4f%s%s", row["round"], row["auc"],
             row["logloss"], row["gauc"], seen, simulated)
