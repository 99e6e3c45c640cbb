"""`fltk fit`: prepare the data, build the model, train, and leave a run directory behind."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L

from fltoolkit.config import ConfigError
from fltoolkit.reports.run_dir import RunDirectory, next_version

log = logging.getLogger("fltk")

SUMMARY_INFO_KEYS = ("num_train", "num_test", "num_clients", "dropped_clients",
                     "baseline_auc", "oracle_auc")


class EvaluationRecorder(L.Callback):
    """Writes one metrics.csv row per evaluation of a centralized run (round = epoch)."""

    def __init__(self, run_dir: RunDirectory, started: float) -> None:
        self.run_dir, self.started = run_dir, started

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = pl_module.last_metrics
        row = {"round": trainer.current_epoch + 1,
               "wall_time_s": round(time.perf_counter() - self.started, 3), **metrics}
        self.run_dir.append_metrics(row)
        log.info("epoch %d: auc %.4f logloss %.4f gauc %.4f", row["round"], metrics["auc"],
                 metrics["logloss"], metrics["gauc"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training loss became {float(loss)} at epoch {trainer.current_epoch + 1}, "
                f"batch {batch_idx}: lower the learning rates (model.*_optimizer)")


def run_fit(cli: Any, experiment_name: str) -> Path:
    """Run the experiment parsed by `cli` (an FltkCLI) and return its run directory."""
    config = cli.config
    datamodule, model = cli.datamodule, cli.model
    datamodule.prepare_data()
    datamodule.setup("fit")
    model.configure_features(datamodule.feature_spec)
    if config.federated.enabled:
        raise ConfigError("federated.enabled: federated training is not available yet; "
                          "use --federated.enabled false")

    run_dir = RunDirectory(config.run_dir or next_version(Path("runs") / experiment_name))
    run_dir.write_config(cli.parser.dump(config, skip_none=False))
    log.info("run directory: %s", run_dir.path)

    started = time.perf_counter()
    trainer: L.Trainer = cli.trainer
    trainer.callbacks.append(EvaluationRecorder(run_dir, started))
    trainer.fit(model, datamodule=datamodule)
    info = datamodule.data.info
    summary = {
        "mode": "centralized",
        **model.last_metrics,
        **{k: info[k] for k in SUMMARY_INFO_KEYS if k in info},
        "epochs": trainer.current_epoch,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    run_dir.write_summary(summary)
    log.info("final: auc %.4f (baseline %s, oracle %s) -> %s", summary["auc"],
             _fmt(summary.get("baseline_auc")), _fmt(summary.get("oracle_auc")), run_dir.path)
    return run_dir.path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
