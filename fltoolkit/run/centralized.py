"""The centralized baseline: the same data, model and metrics, trained by a Lightning Trainer."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L

from fltoolkit.reports.run_dir import RunDirectory
from fltoolkit.run.summary import log_evaluation


class EvaluationRecorder(L.Callback):
    """Writes one metrics.csv row per evaluation of a centralized run (round = epoch) and
    stops on a non-finite training loss."""

    def __init__(self, run_dir: RunDirectory, started: float) -> None:
        self.run_dir, self.started = run_dir, started

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = pl_module.last_metrics
        row = {"round": trainer.current_epoch + 1,
               "wall_time_s": round(time.perf_counter() - self.started, 3), **metrics}
        log_evaluation(self.run_dir, row)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training loss became {float(loss)} at epoch {trainer.current_epoch + 1}, "
                f"batch {batch_idx}: lower the learning rates (model.*_optimizer)")


def train_centrally(trainer: L.Trainer, model: L.LightningModule, datamodule: Any,
                    run_dir: RunDirectory, started: float) -> dict[str, Any]:
    """Fit with the experiment's Trainer; returns the last evaluation's metrics and saves
    the model as checkpoints/final.pt."""
    trainer.callbacks.append(EvaluationRecorder(run_dir, started))
    trainer.fit(model, datamodule=datamodule)
    run_dir.save_model(model.state_dict())
    return model.last_metrics
