"""`fit`: one experiment from its YAML to a run directory; what `fltk fit` and notebooks call.

    from fltoolkit import fit
    result = fit("experiments/taobao.yaml", federated={"rounds": 50})
    result.metrics.select("round", "auc")         # metrics.csv as a polars DataFrame

The steps: parse and check the configuration, prepare the data, build the model, open (or
reopen) the run directory, train federated or centrally, then write summary.json and the
report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import polars as pl
import torch

from datamodules.base import CTRDataModule, FeatureSpec
from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.embeddings.physical import configure_budgeted_features, start_at_logical_scale
from fltoolkit.loop import FederatedLoop, LoopHooks
from fltoolkit.privacy.plan import PrivacyPlan
from fltoolkit.reports.build import build_run_report
from fltoolkit.reports.run_dir import RunDirectory, next_version
from fltoolkit.run.centralized import train_centrally
from fltoolkit.run.checkpointing import (
    RunInterrupted,
    check_same_experiment,
    checkpointer,
    load_checkpoint,
    load_latest,
    load_loop_state,
    load_shard,
    load_shard_state,
    resume_directory,
    save_final_shards,
    server_model_state,
    stop_on_signals,
)
from fltoolkit.run.config import FederatedConfig, check_run
from fltoolkit.run.ranks import Ranks
from fltoolkit.run.summary import log_evaluation, summary
from recsys.parts import embedding_tables
from recsys.sharding import ShardedTables, shard_module_tables
from recsys.table_init import tables_on_meta

log = logging.getLogger("fltk")


@dataclass(frozen=True)
class FitResult:
    """What a run leaves: its directory, summary.json, and metrics.csv as a DataFrame."""

    run_dir: Path
    summary: dict[str, Any]
    metrics: pl.DataFrame


def fit(experiment: str | Path | None = None, *args: str, **sections: Any) -> FitResult | None:
    """Run one experiment and return its results (None on torchrun ranks other than 0).

    Args:
        experiment: the experiment YAML (a path, or the name of a built-in one).
        args: command-line options as `fltk fit` takes them, e.g. "--federated.rounds", "10".
        sections: overrides by section, e.g. `federated={"rounds": 10}`,
            `model={"init_args": {"embedding_dim": 32}}`; applied after `args`.
    """
    from fltoolkit.run.parser import FltkCLI, experiment_name

    argv = ([] if experiment is None else ["--experiment", str(experiment)])
    cli = FltkCLI([*argv, *args, *override_args(sections)])
    ranks = Ranks.from_environment()
    try:
        run_dir = run_experiment(cli, experiment_name(cli.config), ranks)
    finally:
        ranks.close()
    if run_dir is None:
        return None
    return FitResult(run_dir, json.loads((run_dir / "summary.json").read_text()),
                     pl.read_csv(run_dir / "metrics.csv"))


def override_args(sections: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested overrides as command-line options: {"federated": {"rounds": 10}} ->
    ["--federated.rounds", "10"]; lists and other values in JSON, which the parser reads."""
    options: list[str] = []
    for key, value in sections.items():
        if isinstance(value, dict) and value:
            options += override_args(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            options += [f"--{prefix}{key}", text]
    return options


def run_experiment(cli: Any, name: str, ranks: Ranks) -> Path | None:
    """Run the experiment `cli` parsed; rank 0 returns the run directory, other ranks (which
    train their share of each cohort and write only their table shards) None."""
    config, federated = cli.config, cli.config_init["federated"]
    check_run(federated, config.resume, ranks.distributed)
    if not ranks.is_main:
        log.setLevel(logging.WARNING)
    embeddings = cli.config_init["embeddings"]
    embeddings.check_run(federated, privacy=cli.config_init["privacy"].enabled)
    datamodule = prepared(cli.datamodule, ranks)
    sharded = build_model(cli.model, datamodule.feature_spec, federated.sharding, ranks,
                          embeddings, _budget_free_tables(federated, datamodule.feature_spec,
                                                          embeddings))
    if federated.enabled:  # before the run directory exists: a refused run leaves nothing
        federated.check_clients(datamodule.data.train.num_clients)
        federated.check_mode(devices=cli.config_init["systems"].enabled,
                             privacy=cli.config_init["privacy"].enabled)
        federated.local_table_names(list(embedding_tables(cli.model)), sharded is not None)
        if cli.config_init["privacy"].enabled:
            PrivacyPlan.for_run(cli.config_init["privacy"], federated,
                                datamodule.data.train.num_clients,
                                cli.config_init["systems"].enabled, sharded is not None)
    if not ranks.is_main:
        _follow(cli, datamodule, sharded, ranks)
        return None
    run_dir, state = _open_run_directory(cli, name)
    ranks.broadcast(str(run_dir.path))
    log.info("run directory: %s", run_dir.path)
    started = time.perf_counter()
    try:
        if federated.enabled:
            final, mode = _train_federated(cli, datamodule, sharded, ranks, run_dir, state)
        else:
            cli.config_init["centralized"].apply(cli.model)
            final = train_centrally(cli.trainer, cli.model, datamodule, run_dir, started)
            mode = {"mode": "centralized", "epochs": cli.trainer.current_epoch}
    finally:
        run_dir.close()
    result = summary(name, mode, final, datamodule.data.info, cli.config_init["report"],
                     cli.model, sharded, time.perf_counter() - started)
    run_dir.write_summary(result)
    _, html = build_run_report(run_dir.path)
    validation = result.get("validation") or {}
    log.info("final: test auc %.4f (validation %s, best validation round %s; baseline %s, "
             "oracle %s) -> %s", result["auc"], _fmt(validation.get("auc")),
             result.get("best_round", "n/a"), _fmt(result.get("baseline_auc")),
             _fmt(result.get("oracle_auc")), html)
    return run_dir.path


def prepared(datamodule: CTRDataModule, ranks: Ranks) -> CTRDataModule:
    """The datamodule with its splits loaded; one process per machine builds the cache."""
    if ranks.prepares_data:
        datamodule.prepare_data()
    ranks.barrier()
    datamodule.setup("fit")
    return datamodule


def build_model(model: L.LightningModule, features: FeatureSpec, sharding: str, ranks: Ranks,
                embeddings: EmbeddingBudgetConfig | None = None,
                local_tables: list[str] | None = None) -> ShardedTables | None:
    """Build the module's network for `features` (the shared tables other than
    `local_tables` with the physical rows of their `embeddings` budget), shard its tables
    across the ranks unless `sharding` is "none" (built on the meta device first, so no rank
    ever holds them whole), and start every rank from rank 0's weights."""
    with tables_on_meta() if sharding != "none" else nullcontext():
        configure_budgeted_features(model, features, embeddings or EmbeddingBudgetConfig(),
                                    local_tables or [])
    sharded = shard_module_tables(model, sharding) if sharding != "none" else None
    if sharded is not None and embeddings is not None:  # the shards hold TorchRec's draw
        start_at_logical_scale({name: shard for name, (_, shard) in sharded.owned().items()},
                               features, embeddings, local_tables or [])
    ranks.broadcast_module(model)
    return sharded


def _budget_free_tables(federated: FederatedConfig, features: FeatureSpec,
                        embeddings: EmbeddingBudgetConfig) -> list[str]:
    """The client-local tables (named like their features), which a budget leaves whole."""
    if not embeddings.enabled:
        return []
    return federated.local_table_names(features.sparse, federated.sharding != "none")


def _open_run_directory(cli: Any, name: str) -> tuple[RunDirectory, dict[str, Any] | None]:
    """A new run directory with the resolved config, or the one to resume (its rows after
    the newest readable checkpoint dropped) with that checkpoint's state."""
    config = cli.config
    resolved = cli.parser.dump(config, skip_none=False)
    if not config.resume:
        run_dir = RunDirectory(config.run_dir or next_version(Path("runs") / name))
        run_dir.write_config(resolved)
        return run_dir, None
    path = resume_directory(config.resume, name)
    check_same_experiment(path, resolved)
    checkpoint, state = load_latest(path / "checkpoints")
    log.info("resuming %s after round %d (%s)", path, state["completed_rounds"], checkpoint.name)
    return RunDirectory(path, resume_after=state["completed_rounds"]), state


def _loop(cli: Any, datamodule: CTRDataModule, sharded: ShardedTables | None, ranks: Ranks,
          hooks: LoopHooks) -> FederatedLoop:
    loop = FederatedLoop(cli.model, datamodule.data, cli.config_init["federated"],
                         seed=cli.config.seed, eval_batch_size=datamodule.eval_batch_size,
                         systems=cli.config_init["systems"], ranks=ranks,
                         sharded_tables=sharded, hooks=hooks,
                         privacy=cli.config_init["privacy"],
                         embeddings=cli.config_init["embeddings"])
    if ranks.distributed:
        log.info("%d ranks share each cohort (backend %s)", ranks.world_size,
                 torch.distributed.get_backend())
    if sharded is not None:
        log.info("tables sharded %s", sharded.plan_summary())
    return loop


def _train_federated(cli: Any, datamodule: CTRDataModule, sharded: ShardedTables | None,
                     ranks: Ranks, run_dir: RunDirectory, state: dict[str, Any] | None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0's federated run: (the final metrics row, what summary.json says of the run)."""
    federated = cli.config_init["federated"]

    with _progress_bar(federated.rounds) as advance:
        hooks = LoopHooks(on_round=run_dir.append_round,
                          on_evaluation=lambda row: log_evaluation(run_dir, row),
                          on_checkpoint=checkpointer(ranks, run_dir.checkpoints,
                                                     federated.keep_last),
                          on_progress=advance)
        loop = _loop(cli, datamodule, sharded, ranks, hooks)
        if state is not None:
            load_loop_state(loop, state)
            if loop.server_tables.sharded:
                load_shard_state(loop, load_shard(run_dir.checkpoints, loop.completed_rounds,
                                                  ranks.rank))
        try:
            with stop_on_signals(loop.request_stop):
                final = loop.run()
        except RunInterrupted:
            run_dir.write_clients(loop.client_report())
            build_run_report(run_dir.path)  # from the CSVs; the caller closes the rest
            raise
    run_dir.write_clients(loop.client_report())
    run_dir.save_model(server_model_state(loop))
    save_final_shards(loop, ranks, run_dir.checkpoints)
    strategy = loop.strategy
    return final, {"mode": "federated", "strategy": strategy.name,
                   "strategy_hyperparameters": strategy.hyperparameters(),
                   "strategy_summary": strategy.summary(), "rounds": federated.rounds,
                   "clients_per_round": federated.clients_per_round,
                   **_federated_mode(federated),
                   "local_tables": list(loop.local_tables.initial) if loop.local_tables else [],
                   "selector": type(loop.selector).__name__,
                   "trainer": type(loop.trainer).__name__,
                   "server_learns": loop.server_learns(),
                   **loop.embedding_rows(),
                   **cli.config_init["report"].to_target(loop.history)}


def _federated_mode(federated: FederatedConfig) -> dict[str, Any]:
    """summary.json's `federated_mode` and, in async mode, the server's resolved settings
    (the defaults filled in), which the report's asynchronous table shows."""
    if federated.mode != "async":
        return {"federated_mode": federated.mode}
    policy = federated.async_policy()
    return {"federated_mode": "async", "concurrency": policy.concurrency,
            "buffer_size": policy.buffer_size, "staleness": asdict(policy.staleness),
            "max_staleness": policy.max_staleness}


def _follow(cli: Any, datamodule: CTRDataModule, sharded: ShardedTables | None,
            ranks: Ranks) -> None:
    """A rank other than 0: the same rounds, checkpoints and evaluations; it writes only its
    table shards, if sharded, into the run directory rank 0 resolved (and checked)."""
    federated = cli.config_init["federated"]
    checkpoints = Path(ranks.broadcast(None)) / "checkpoints"
    hooks = LoopHooks(on_checkpoint=checkpointer(ranks, checkpoints, federated.keep_last))
    loop = _loop(cli, datamodule, sharded, ranks, hooks)
    if cli.config.resume:
        load_checkpoint(loop, ranks, checkpoints)
    with stop_on_signals(loop.request_stop):
        try:
            loop.run()
        except RunInterrupted as stopped:
            stopped.quiet = True
            raise
    save_final_shards(loop, ranks, checkpoints)


@contextmanager
def _progress_bar(rounds: int) -> Iterator[Any]:
    """A progress bar over the rounds; yields the loop's on_progress hook."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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

        yield advance


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
