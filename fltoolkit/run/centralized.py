"""The centralized baseline: the same data, model and metrics, trained by a Lightning Trainer.

"FL costs X AUC" is only honest when each mode runs with its own best settings, so the
baseline may take its own optimizers (the experiment's `centralized` section; its epochs are
the `trainer` section's). Lightning validates on the validation split after every epoch
(metrics.csv); the test split is held out as in federated runs (fltoolkit.server.held_out).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.cli import OptimizerCallable

from datamodules.base import CTRDataModule
from fltoolkit.reports.run_dir import RunDirectory
from fltoolkit.run.config import ConfigError
from fltoolkit.run.summary import log_evaluation
from fltoolkit.server.evaluation import predict_logits
from fltoolkit.server.held_out import HeldOutTest
from recsys.metrics import ctr_metrics


class CentralizedConfig:
    """Optimizers of the centralized baseline (`federated.enabled: false`), where they differ
    from the model's, which are the federated clients' local optimizers.

    Args:
        dense_optimizer: replaces `model.init_args.dense_optimizer` in centralized runs.
        sparse_optimizer: replaces `model.init_args.sparse_optimizer` in centralized runs.
    """

    def __init__(self, dense_optimizer: OptimizerCallable | None = None,
                 sparse_optimizer: OptimizerCallable | None = None) -> None:
        self.dense_optimizer = dense_optimizer
        self.sparse_optimizer = sparse_optimizer

    def apply(self, model: L.LightningModule) -> None:
        """Give the model the centralized optimizers that are set."""
        for name in ("dense_optimizer", "sparse_optimizer"):
            chosen = getattr(self, name)
            if chosen is None:
                continue
            if not hasattr(model, name):
                raise ConfigError(f"centralized.{name}: the model "
                                  f"({type(model).__name__}) has no {name} to replace")
            setattr(model, name, chosen)


class EvaluationRecorder(L.Callback):
    """Writes one metrics.csv row per evaluation of a centralized run (round = epoch), scores
    the held-out test split alongside, and stops on a non-finite training loss."""

    def __init__(self, run_dir: RunDirectory, datamodule: CTRDataModule, started: float
                 ) -> None:
        self.run_dir, self.datamodule, self.started = run_dir, datamodule, started
        self.held_out = HeldOutTest()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = pl_module.last_metrics
        epoch = trainer.current_epoch + 1
        row = {"round": epoch, "wall_time_s": round(time.perf_counter() - self.started, 3),
               **metrics}
        log_evaluation(self.run_dir, row)
        data = self.datamodule.data
        if data.validation is not None:
            test = data.test
            logits = predict_logits(pl_module, test, self.datamodule.eval_batch_size)
            self.held_out.observe(epoch, metrics,
                                  ctr_metrics(logits, test.label, test.row_clients()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training loss became {float(loss)} at epoch {trainer.current_epoch + 1}, "
                f"batch {batch_idx}: lower the learning rates (model.*_optimizer)")


def train_centrally(trainer: L.Trainer, model: L.LightningModule, datamodule: CTRDataModule,
                    run_dir: RunDirectory, started: float) -> dict[str, Any]:
    """Fit with the experiment's Trainer; returns the last evaluation's metrics with the
    held-out test results and saves the model as checkpoints/final.pt."""
    recorder = EvaluationRecorder(run_dir, datamodule, started)
    trainer.callbacks.append(recorder)
    trainer.fit(model, datamodule=datamodule)
    run_dir.save_model(model.state_dict())
    return {**model.last_metrics, **recorder.held_out.summary(model.last_metrics)}
