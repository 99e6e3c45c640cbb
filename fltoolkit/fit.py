"""`fltk fit`: prepare the data, build the model, train, and leave a run directory behind."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.base import FeatureSpec
from fltoolkit.checkpoint import (
    load_latest,
    load_shard,
    save_atomically,
    save_checkpoint,
    save_shard,
)
from fltoolkit.config import ConfigError
from fltoolkit.distributed import Ranks
from fltoolkit.loop import FederatedLoop, RunInterrupted
from fltoolkit.reports.build import build_run_report
from fltoolkit.reports.run_dir import RunDirectory, next_version
from fltoolkit.resume import check_same_experiment, resume_directory, stop_on_signals
from recsys.sharding import ShardedTables, shard_module_tables
from recsys.table_init import tables_on_meta

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
    sharding = federated.sharding
    if sharding != "none" and not ranks.distributed:
        raise ConfigError(f"federated.sharding={sharding} splits the tables across ranks: "
                          "launch with torchrun --nproc_per_node N (N >= 2)")
    if not ranks.is_main:
        log.setLevel(logging.WARNING)
    datamodule, model = cli.datamodule, cli.model
    if ranks.prepares_data:  # the machine's other ranks read the cache it builds
        datamodule.prepare_data()
    ranks.barrier()
    datamodule.setup("fit")
    sharded = build_model(model, datamodule.feature_spec, sharding, ranks)
    loop = None
    if federated.enabled:
        loop = FederatedLoop(model, datamodule.data, federated, seed=config.seed,
                             eval_batch_size=datamodule.eval_batch_size,
                             systems=cli.config_init["systems"], ranks=ranks,
                             sharded_tables=sharded)
        if ranks.distributed:
            log.info("%d ranks share each cohort (backend %s)", ranks.world_size,
                     torch.distributed.get_backend())
        if sharded is not None:
            log.info("tables sharded %s", sharded.plan_summary())
    if not ranks.is_main:
        assert loop is not None  # checked above: distributed runs are federated
        _follow(loop, ranks, bool(config.resume), federated.keep_last)
        return None

    resolved = cli.parser.dump(config, skip_none=False)
    if config.resume:
        run_dir = _resumed(config.resume, experiment_name, resolved, loop, ranks)
    else:
        run_dir = RunDirectory(config.run_dir or next_version(Path("runs") / experiment_name))
        run_dir.write_config(resolved)
    ranks.broadcast(str(run_dir.path))
    log.info("run directory: %s", run_dir.path)
    report = cli.config_init["report"]
    started = time.perf_counter()
    try:
        if loop is None:
            final = _train_centrally(cli.trainer, model, datamodule, run_dir, started)
            extra = {"mode": "centralized", "epochs": cli.trainer.current_epoch}
            run_dir.save_model(model.state_dict())
        else:
            loop.on_checkpoint = _checkpointer(loop, ranks, run_dir.checkpoints,
                                               federated.keep_last)
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
            _save_final_shards(loop, ranks, run_dir.checkpoints)
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
        "model_parameters": sum(p.numel() for p in model.parameters())
        + (sharded.num_parameters() if sharded else 0),  # the module holds placeholders
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    run_dir.write_summary(summary)
    markdown, html = build_run_report(run_dir.path)
    log.info("final: auc %.4f (baseline %s, oracle %s) -> %s", summary["auc"],
             _fmt(summary.get("baseline_auc")), _fmt(summary.get("oracle_auc")), html)
    return run_dir.path


def build_model(model: L.LightningModule, features: FeatureSpec, sharding: str, ranks: Ranks
                ) -> ShardedTables | None:
    """Build the module's network for `features`, shard its tables across the ranks unless
    `sharding` is "none" (built on the meta device first, so no rank ever holds them whole),
    and start every rank from rank 0's weights."""
    with tables_on_meta() if sharding != "none" else nullcontext():
        model.configure_features(features)
    sharded = shard_module_tables(model, sharding) if sharding != "none" else None
    ranks.broadcast_module(model)
    return sharded


def _follow(loop: FederatedLoop, ranks: Ranks, resume: bool, keep_last: int) -> None:
    """A rank other than 0: the same rounds, checkpoints and evaluations; it writes only its
    table shards, if sharded, into the run directory rank 0 resolved (and checked)."""
    checkpoints = Path(ranks.broadcast(None)) / "checkpoints"
    if resume:
        _load(loop, ranks, checkpoints)
    loop.on_checkpoint = _checkpointer(loop, ranks, checkpoints, keep_last)
    with stop_on_signals(lambda: setattr(loop, "stop_requested", True)):
        try:
            loop.run()
        except RunInterrupted as stopped:
            stopped.quiet = True
            raise
    _save_final_shards(loop, ranks, checkpoints)


def _checkpointer(loop: FederatedLoop, ranks: Ranks, checkpoints: Path, keep_last: int
                  ) -> Callable[[int], None]:
    """The loop's on_checkpoint, run by every rank (gathering the state is collective): each
    rank writes its table shards if sharded, then rank 0 the round's file."""
    def checkpoint(round_index: int) -> None:
        state = loop.state_dict()
        shards = loop.shard_state_dict()
        if shards is not None:
            save_shard(checkpoints, round_index, ranks.rank, shards, keep_last)
            ranks.barrier()  # the round's file only once every rank's shards are on disk
        if ranks.is_main:
            save_checkpoint(checkpoints, round_index, state, keep_last)
    return checkpoint


def _load(loop: FederatedLoop, ranks: Ranks, checkpoints: Path) -> Path:
    """Load the newest readable checkpoint (and this rank's shards of it) into `loop`."""
    checkpoint, state = load_latest(checkpoints)
    loop.load_state_dict(state)
    if loop.server_tables.sharded:
        loop.load_shard_state_dict(load_shard(checkpoints, loop.completed_rounds, ranks.rank))
    return checkpoint


def _save_final_shards(loop: FederatedLoop, ranks: Ranks, checkpoints: Path) -> None:
    """Sharded tables: each rank's final shards beside final.pt (which has no tables)."""
    shards = loop.shard_state_dict()
    if shards is not None:
        save_atomically(checkpoints / f"final.rank{ranks.rank}.pt", shards)


def _resumed(resume: str, experiment_name: str, resolved: str,
             loop: FederatedLoop | None, ranks: Ranks) -> RunDirectory:
    """Reopen the run to continue and load its newest readable checkpoint into `loop`."""
    if loop is None:
        raise ConfigError("--resume continues federated runs; this experiment is centralized")
    path = resume_directory(resume, experiment_name)
    check_same_experiment(path, resolved)
    checkpoint = _load(loop, ranks, path / "checkpoints")
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
