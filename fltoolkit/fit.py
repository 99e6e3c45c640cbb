"""`fltk fit`: prepare the data, build the model, train, and leave a run directory behind."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fltoolkit.checkpoint import load_latest, save_checkpoint
from fltoolkit.config import ConfigError
from fltoolkit.distributed import Ranks
from fltoolkit.loop import FederatedLoop, RunInterrupted
from fltoolkit.reports.build import build_run_report
from fltoolkit.reports.run_dir import RunDirectory, next_version
from fltoolkit.resume import check_same_experiment, resume_directory, stop_on_signals

log = logging.getLogger("fltk")

SUMMARY_INFO_KEYS = ("num_train", "num_test", "num_clients", "dropped_clients",
                     "baseline_auc", "oracle_auc", "bad_rows_skipped")
METRIC_KEYS = ("auc", "logloss", "ne", "gauc", "calibration")
FEDERATED_KEYS = ("clients_seen", "bytes_up_total", "bytes_down_total", "bytes_up_per_round",
                  "bytes_down_per_round", "rejected_total", "sim_time_s")


class EvaluationRecorder(L.Callback):
    """Writes one metrics.csv row per evaluation of a centralized run (round = epoch)."""

    def __init__(self, run_dir: RunDirectory, started: float) -> None:
        self.run_dir, self.started = run_dir, started

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = pl_module.last_metrics
        row = {"round": trainer.current_epoch + 1,
               "wall_time_s": round(time.perf_counter() - self.started, 3), **metrics}
        _record(self.run_dir, row)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training loss became {float(loss)} at epoch {trainer.current_epoch + 1}, "
                f"batch {batch_idx}: lower the learning rates (model.*_optimizer)")


def run_fit(cli: Any, experiment_name: str) -> Path | None:
    """Run the experiment parsed by `cli` (an FltkCLI) and return its run directory.

    Under torchrun every rank runs this; rank 0 writes the run directory and returns it, the
    others train their share of each cohort and return None.
    """
    ranks = Ranks.from_environment()
    try:
        return _run_fit(cli, experiment_name, ranks)
    finally:
        ranks.close()


def _run_fit(cli: Any, experiment_name: str, ranks: Ranks) -> Path | None:
    config = cli.config
    federated = cli.config_init["federated"]
    if ranks.distributed and not federated.enabled:
        raise ConfigError("several ranks (torchrun) split federated cohorts; centralized "
                          "training runs in one process (set federated.enabled true)")
    if not ranks.is_main:
        log.setLevel(logging.WARNING)
    datamodule, model = cli.datamodule, cli.model
    if ranks.prepares_data:  # the machine's other ranks read the cache it builds
        datamodule.prepare_data()
    ranks.barrier()
    datamodule.setup("fit")
    model.configure_features(datamodule.feature_spec)
    ranks.broadcast_module(model)
    loop = None
    if federated.enabled:
        loop = FederatedLoop(model, datamodule.data, federated, seed=config.seed,
                             eval_batch_size=datamodule.eval_batch_size,
                             systems=cli.config_init["systems"], ranks=ranks)
        if ranks.distributed:
            log.info("%d ranks share each cohort (backend %s)", ranks.world_size,
                     torch.distributed.get_backend())
    if not ranks.is_main:
        assert loop is not None  # checked above: distributed runs are federated
        _follow(loop, ranks, bool(config.resume))
        return None

    resolved = cli.parser.dump(config, skip_none=False)
    if config.resume:
        run_dir = _resumed(config.resume, experiment_name, resolved, loop)
        ranks.broadcast(str(run_dir.path))
    else:
        run_dir = RunDirectory(config.run_dir or next_version(Path("runs") / experiment_name))
        run_dir.write_config(resolved)
    log.info("run directory: %s", run_dir.path)
    report = cli.config_init["report"]
    started = time.perf_counter()
    try:
        if loop is None:
            final = _train_centrally(cli.trainer, model, datamodule, run_dir, started)
            extra = {"mode": "centralized", "epochs": cli.trainer.current_epoch}
            run_dir.save_model(model.state_dict())
        else:
            loop.on_checkpoint = lambda round_index: save_checkpoint(
                run_dir.checkpoints, round_index, loop.state_dict(), federated.keep_last)
            try:
                with stop_on_signals(lambda: setattr(loop, "stop_requested", True)):
                    final = _train_federated(loop, federated.rounds, run_dir)
            except RunInterrupted:
                build_run_report(run_dir.path)  # from the CSVs; the finally closes the rest
                raise
            extra = {"mode": "federated", "strategy": loop.strategy.name,
                     "strategy_hyperparameters": loop.strategy.hyperparameters(),
                     "strategy_summary": loop.strategy.summary(),
                     "rounds": federated.rounds,
                     "clients_per_round": federated.clients_per_round,
                     "local_tables": list(loop.local_tables.initial) if loop.local_tables else [],
                     "selector": type(loop.selector).__name__,
                     **report.to_target(loop.history)}
            run_dir.save_model(loop.server_state_dict())
    finally:
        run_dir.close()
    info = datamodule.data.info
    summary = {
        "experiment": experiment_name,
        **extra,
        **{k: final[k] for k in METRIC_KEYS},
        **{k: final[k] for k in FEDERATED_KEYS if k in final},
        **{k: info[k] for k in SUMMARY_INFO_KEYS if k in info},
        **report.known_baselines(),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    run_dir.write_summary(summary)
    markdown, html = build_run_report(run_dir.path)
    log.info("final: auc %.4f (baseline %s, oracle %s) -> %s", summary["auc"],
             _fmt(summary.get("baseline_auc")), _fmt(summary.get("oracle_auc")), html)
    return run_dir.path


def _follow(loop: FederatedLoop, ranks: Ranks, resume: bool) -> None:
    """A rank other than 0: the same rounds, checkpoints and evaluations, no files written."""
    if resume:  # the run directory rank 0 resolved (and checked)
        _, state = load_latest(Path(ranks.broadcast(None)) / "checkpoints")
        loop.load_state_dict(state)
    loop.on_checkpoint = lambda round_index: loop.state_dict()  # collective: every rank joins
    with stop_on_signals(lambda: setattr(loop, "stop_requested", True)):
        loop.run()


def _resumed(resume: str, experiment_name: str, resolved: str,
             loop: FederatedLoop | None) -> RunDirectory:
    """Reopen the run to continue and load its newest readable checkpoint into `loop`."""
    if loop is None:
        raise ConfigError("--resume continues federated runs; this experiment is centralized")
    path = resume_directory(resume, experiment_name)
    check_same_experiment(path, resolved)
    checkpoint, state = load_latest(path / "checkpoints")
    loop.load_state_dict(state)
    log.info("resuming %s after round %d (%s)", path, loop.completed_rounds, checkpoint.name)
    return RunDirectory(path, resume_after=loop.completed_rounds)


def _train_centrally(trainer: L.Trainer, model: L.LightningModule, datamodule: Any,
                     run_dir: RunDirectory, started: float) -> dict[str, Any]:
    trainer.callbacks.append(EvaluationRecorder(run_dir, started))
    trainer.fit(model, datamodule=datamodule)
    return model.last_metrics


def _train_federated(loop: FederatedLoop, rounds: int, run_dir: RunDirectory
                     ) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    def evaluated(row: dict[str, Any]) -> None:
        _record(run_dir, row)
        run_dir.write_clients(loop.client_report())

    loop.on_evaluation = evaluated
    loop.on_round = run_dir.append_round
    columns = [TextColumn("round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("rounds", total=rounds, status="")

        def advance(round_index: int, row: dict[str, Any] | None) -> None:
            status = {}
            if row:
                simulated = (f" sim {row['sim_time_s'] / 60:.1f} min" if "sim_time_s" in row
                             else "")
                status = {"status": f"auc {row['auc']:.4f}{simulated}"}
            bar.update(task, completed=round_index, **status)

        return loop.run(progress=advance)


def _record(run_dir: RunDirectory, row: dict[str, Any]) -> None:
    """One evaluation: a metrics.csv row and a log line (round = epoch when centralized)."""
    run_dir.append_metrics(row)
    seen = f" clients_seen {row['clients_seen']}" if "clients_seen" in row else ""
    simulated = f" sim_time {row['sim_time_s']:.0f} s" if "sim_time_s" in row else ""
    log.info("round %d: auc %.4f logloss %.4f gauc %.4f%s%s", row["round"], row["auc"],
             row["logloss"], row["gauc"], seen, simulated)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
