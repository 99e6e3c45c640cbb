"""FederatedLoop: the round loop, and nothing else.

Each round: select clients (with simulated devices: over-commit among those online, then
keep the fastest that stay online and meet the deadline, advancing the clock) -> train each
from the current global weights -> drop updates that are not finite -> aggregate with the
strategy -> tell the selector -> evaluate every `eval_interval` rounds. The global model is
the LightningModule itself; a round's clients train on it in turn and leave it as they found
it (see CohortTrainer).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.base import PreparedData
from fltoolkit.client import CohortTrainer, LocalSchedule
from fltoolkit.config import ConfigError, FederatedConfig
from fltoolkit.distributed import Ranks
from fltoolkit.evaluation import evaluate
from fltoolkit.faults import norm_outliers
from fltoolkit.model_parts import split_parameters
from fltoolkit.optimizer_state import ClientOptimizerStates
from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.server_tables import ServerTables, ShardedServerTables
from fltoolkit.strategies.base import ServerModel
from fltoolkit.systems.clock import client_seconds
from fltoolkit.systems.config import SystemsConfig
from fltoolkit.updates import ClientUpdate
from recsys.sharding import ShardedTables

log = logging.getLogger("fltk")

# training_step calls self.log, which has no trainer to report to inside the loop.
warnings.filterwarnings("ignore", message=".*self.log.*trainer. reference is not registered.*")


IDLE_WAIT_S = 60.0  # simulated wait when too few clients are online to start a round
ROUND_COUNTERS = ("selected", "clients", "aggregated", "rejected", "crashed", "dropped",
                  "stragglers", "skipped", "bytes_up", "bytes_down")


@dataclass
class RoundStats:
    """Totals of the rounds since the last evaluation."""

    rounds: int = 0
    selected: int = 0
    clients: int = 0
    aggregated: int = 0
    rejected: int = 0
    crashed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: int = 0
    stragglers: int = 0
    skipped: int = 0
    losses: list[float] = field(default_factory=list)


class RunInterrupted(Exception):
    """The run stopped on request after `round` (a checkpoint of that round was written)."""

    exit_code = 130  # the shell's code for a job stopped by SIGINT
    quiet = False  # set on ranks other than 0: rank 0 prints the run's one line

    def __init__(self, round_index: int) -> None:
        super().__init__(f"interrupted after round {round_index} (checkpoint written); "
                         "continue with the same command and --resume RUN_DIR")
        self.round = round_index


class FederatedLoop:
    """Runs `config.rounds` rounds of federated training of `module` on `data`.

    Args:
        module: the LightningModule, already built for the data's features.
        data: the prepared splits (train clients and test rows).
        config: the federated section of the experiment.
        seed: the run's seed (selection and local batch order derive from it).
        eval_batch_size: rows per evaluation batch.
        on_evaluation: called with each evaluation's metrics row (e.g. to write metrics.csv).
        on_round: called with each round's row: ROUND_COUNTERS, and with simulated devices
            the round's simulated duration and the clock (e.g. to write rounds.csv).
        systems: simulated devices and round policy; None or disabled: every selected client
            is aggregated and there is no clock.
        ranks: the processes sharing the cohort (fltoolkit.distributed); one by default.
        sharded_tables: the module's tables, sharded across `ranks` (recsys.sharding
            `shard_module_tables`); None: the module holds them whole.
    """

    def __init__(self, module: torch.nn.Module, data: PreparedData, config: FederatedConfig,
                 seed: int, eval_batch_size: int = 65536,
                 on_evaluation: Callable[[dict[str, Any]], None] | None = None,
                 systems: SystemsConfig | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 ranks: Ranks | None = None,
                 sharded_tables: ShardedTables | None = None) -> None:
        self.module, self.data, self.config, self.seed = module, data, config, seed
        self.ranks = ranks or Ranks()
        self.eval_batch_size = eval_batch_size
        self.on_evaluation = on_evaluation or (lambda row: None)
        self.on_round = on_round or (lambda row: None)
        self.parts = split_parameters(module, data.features.sparse)
        local = self._local_table_names()
        if local and sharded_tables is not None:
            raise ConfigError("federated.local_tables and federated.sharding exclude each other: "
                              "local tables live with their clients, not on the server's shards")
        self.local_tables = (LocalTableStore({n: self.parts.tables[n].weight for n in local})
                             if local else None)
        self.server_tables = (ShardedServerTables(sharded_tables) if sharded_tables else
                              ServerTables({name: part.weight.detach()
                                            for name, part in self.parts.tables.items()
                                            if name not in local}))
        self.strategy = config.strategy
        self.selector = config.selector
        num_clients = data.train.num_clients
        if config.clients_per_round > num_clients:
            raise ConfigError(f"federated.clients_per_round={config.clients_per_round} exceeds "
                              f"the {num_clients} training clients")
        self.selector.bind(num_clients, seed)
        self.trainer = CohortTrainer(
            module, self.parts, data.train,
            LocalSchedule(config.batch_size, config.local_steps or 1, config.local_epochs),
            self.server_tables, proximal_mu=self.strategy.proximal_mu,
            local_tables=self.local_tables,
            optimizer_states=ClientOptimizerStates() if config.keep_optimizer_state else None)
        self.participation = np.zeros(num_clients, dtype=np.int64)
        enabled = systems is not None and systems.enabled
        self.population = systems.population(num_clients, seed) if enabled else None
        self.policy = systems.policy if enabled else None
        self.sim_time_s = 0.0
        self.history: list[dict[str, Any]] = []
        self.completed_rounds = 0
        self.wall_time_s = 0.0
        self.stats, self.totals = RoundStats(), RoundStats()
        self.last: dict[str, Any] = {}
        self.stop_requested = False
        self.on_checkpoint: Callable[[int], None] = lambda round_index: None
        self.test_clients = pl.DataFrame(schema={"client": pl.Int64, "test_rows": pl.Int64,
                                                 "test_auc": pl.Float64})

    def _local_table_names(self) -> list[str]:
        wanted = self.config.local_tables
        names = list(self.parts.tables) if wanted == "all" else list(wanted)
        unknown = [n for n in names if n not in self.parts.tables]
        if unknown:
            raise ConfigError(f"federated.local_tables: unknown table(s) {unknown}; the model's "
                              f"tables are {list(self.parts.tables)}")
        return names

    def run(self, progress: Callable[[int, dict[str, Any] | None], None] | None = None
            ) -> dict[str, Any]:
        """Train the remaining rounds (all of them unless resumed from a checkpoint); returns
        the last evaluation's row.

        After every `checkpoint_interval`-th round and the last one, `on_checkpoint` receives
        the round; when `stop_requested` is set (e.g. by a signal handler) the loop checkpoints
        after the current round and raises RunInterrupted.
        """
        log.info("strategy:\n%s", self.strategy.summary())
        started = time.perf_counter() - self.wall_time_s
        for round_index in range(self.completed_rounds + 1, self.config.rounds + 1):
            self.run_round(round_index, self.stats)
            evaluate_now = (round_index % self.config.eval_interval == 0
                            or round_index == self.config.rounds)
            if evaluate_now:
                self.last = self._evaluate(round_index, self.stats, started)
                for key in ("rounds", "clients", "rejected", "bytes_up", "bytes_down"):
                    setattr(self.totals, key,
                            getattr(self.totals, key) + getattr(self.stats, key))
                self.stats = RoundStats()
            self.completed_rounds = round_index
            self.wall_time_s = time.perf_counter() - started
            if progress is not None:
                progress(round_index, self.last if evaluate_now else None)
            stop = self.ranks.any(self.stop_requested)  # every rank stops after the same round
            if (round_index % self.config.checkpoint_interval == 0
                    or round_index == self.config.rounds or stop):
                self.on_checkpoint(round_index)
            if stop and round_index < self.config.rounds:
                raise RunInterrupted(round_index)
        last = dict(self.last)
        last.update(bytes_up_total=self.totals.bytes_up, bytes_down_total=self.totals.bytes_down,
                    bytes_up_per_round=self.totals.bytes_up // max(self.totals.rounds, 1),
                    bytes_down_per_round=self.totals.bytes_down // max(self.totals.rounds, 1),
                    rejected_total=self.totals.rejected)
        if self.population is not None:
            last.update(sim_time_s=round(self.sim_time_s, 3))
        return last

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (tensors and plain values only,
        so a checkpoint loads with `torch.load(weights_only=True)`).

        Collective under several ranks: each holds its own clients' local rows and optimizer
        state, and rank 0, which writes the checkpoints, receives all of them; on the other
        ranks these two entries are None."""
        local_tables = _merged_by_client(self.ranks.gather_on_main(
            self.local_tables.state_dict() if self.local_tables else None), depth=2)
        optimizer_states = _merged_by_client(self.ranks.gather_on_main(
            self.trainer.optimizer_states.state_dict(self._parameters())
            if self.trainer.optimizer_states else None), depth=1)
        return {
            "completed_rounds": self.completed_rounds,
            "module": self.module.state_dict(),
            "strategy": self.strategy.state_dict(),
            "selector": self.selector.state_dict(),
            "local_tables": local_tables,
            "optimizer_states": optimizer_states,
            "sim_time_s": self.sim_time_s,
            "wall_time_s": self.wall_time_s,
            "participation": torch.from_numpy(self.participation.copy()),
            "history": list(self.history),
            "last": dict(self.last),
            "stats": asdict(self.stats),
            "totals": asdict(self.totals),
            "torch_rng": torch.get_rng_state(),
        }

    def shard_state_dict(self) -> dict[str, Any] | None:
        """With sharded tables, what only this rank holds: its shards and the strategy's state
        of them (for its own checkpoint file); None otherwise."""
        tables = self.server_tables.state_dict()
        return None if tables is None else {"tables": tables,
                                            "strategy": self.strategy.state_dict()}

    def load_shard_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `shard_state_dict()`'s output, after `load_state_dict`."""
        self.server_tables.load_state_dict(state["tables"])
        self.strategy.load_state_dict(state["strategy"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output (the same experiment, built afresh)."""
        self.module.load_state_dict(state["module"])
        self.strategy.load_state_dict(state["strategy"])
        self.selector.load_state_dict(state["selector"])
        if self.local_tables is not None:  # each rank keeps its own clients' rows only
            self.local_tables.load_state_dict(
                {table: self._own(rows) for table, rows in state["local_tables"].items()})
        if self.trainer.optimizer_states is not None:
            self.trainer.optimizer_states.load_state_dict(self._own(state["optimizer_states"]),
                                                          self._parameters())
        self.completed_rounds = state["completed_rounds"]
        self.sim_time_s, self.wall_time_s = state["sim_time_s"], state["wall_time_s"]
        self.participation = state["participation"].numpy().copy()
        self.history, self.last = list(state["history"]), dict(state["last"])
        self.stats, self.totals = RoundStats(**state["stats"]), RoundStats(**state["totals"])
        torch.set_rng_state(state["torch_rng"])

    def run_round(self, round_index: int, stats: RoundStats) -> None:
        """One round; adds to `stats` and reports the round's own row to `on_round`."""
        before = replace(stats, losses=[])
        sim_before = self.sim_time_s
        started = time.perf_counter()
        self._round(round_index, stats)
        row = {"round": round_index, **{key: getattr(stats, key) - getattr(before, key)
                                        for key in ROUND_COUNTERS},
               "round_wall_s": round(time.perf_counter() - started, 4)}
        if self.population is not None:
            row.update(round_duration_s=round(self.sim_time_s - sim_before, 3),
                       sim_time_s=round(self.sim_time_s, 3))
        self.on_round(row)

    def _round(self, round_index: int, stats: RoundStats) -> None:
        wanted = self.config.clients_per_round
        durations = None
        if self.population is None:
            chosen = self.selector.select(round_index, wanted).tolist()
            stats.selected += len(chosen)
        else:
            chosen, durations = self._admitted(round_index, wanted, stats)
        if not chosen:
            stats.rounds += 1
            return
        clients = np.array(chosen)
        mine = [client for client in chosen if self.ranks.owns(client)]
        trained = self.trainer.train_round(
            mine, [self._client_seed(round_index, client) for client in mine])
        updates = self._accepted(
            self.ranks.cohort_updates(chosen, trained, self.trainer.dense_size),
            round_index, stats)
        stats.rounds += 1
        stats.clients += len(clients)
        stats.aggregated += len(updates)
        self.participation[clients] += 1
        if not updates:
            log.warning("round %d: no valid update, the global model is unchanged", round_index)
            return
        if not self._aggregate(updates):
            stats.skipped += 1
            log.warning("round %d: aggregation gave NaN/Inf weights; the round's update was "
                        "discarded (lower the server learning rate or use a robust strategy)",
                        round_index)
        self.selector.feedback(round_index, updates, durations)

    @torch.no_grad()
    def _aggregate(self, updates: list[ClientUpdate]) -> bool:
        """Apply the strategy to the tables (or shards) this rank holds; if the new global
        weights are not finite on any rank, put back the old ones (only the rows the round
        touched can have changed) and return False."""
        tables = self.server_tables.owned()
        updates = [self.server_tables.owned_part(update) for update in updates]
        touched = {name: torch.unique(torch.cat([u.tables[name].ids for u in updates
                                                 if name in u.tables]))
                   for name in tables if any(name in u.tables for u in updates)}
        before = {name: tables[name][ids].clone() for name, ids in touched.items()}
        server = ServerModel(parameters_to_vector(self.parts.dense).detach().clone(), tables)
        self.strategy.aggregate(updates, server)
        sums = [server.dense.sum(), *(tables[name][ids].sum() for name, ids in touched.items())]
        broken = not bool(torch.isfinite(torch.stack(sums)).all())
        if self.server_tables.sharded:  # a shard elsewhere may be the one that broke
            broken = self.ranks.any(broken)
        if broken:
            for name, ids in touched.items():
                tables[name][ids] = before[name]
            return False
        vector_to_parameters(server.dense, self.parts.dense)
        return True

    def _accepted(self, updates: list[ClientUpdate], round_index: int, stats: RoundStats
                  ) -> list[ClientUpdate]:
        """The updates fit to aggregate: faults injected (if configured), then non-finite
        ones and norm outliers rejected (counted, never aggregated)."""
        faults = self.config.faults
        valid = []
        for update in updates:
            stats.bytes_down += update.download_bytes
            if faults.active:
                update = faults.inject(update, self.seed, round_index)
                if update is None:
                    stats.crashed += 1
                    continue
            stats.bytes_up += update.upload_bytes()
            if update.is_finite() and np.isfinite(update.loss):
                valid.append(update)
            else:
                stats.rejected += 1
        ratio = self.config.reject_norm_ratio
        if ratio is not None and len(valid) > 2:
            outlier = norm_outliers(valid, ratio).tolist()
            stats.rejected += sum(outlier)
            valid = [u for u, bad in zip(valid, outlier, strict=True) if not bad]
        stats.losses.extend(update.loss for update in valid)
        return valid

    def _admitted(self, round_index: int, wanted: int, stats: RoundStats
                  ) -> tuple[list[int], dict[int, float]]:
        """Over-commit, simulate each selected client's round time, keep who finishes first;
        returns the kept clients and the observed simulated seconds of every client that
        stayed online (kept, stragglers, and late ones capped at the deadline).

        Durations are known before training (the plan gives every client's bytes and samples),
        so stragglers and dropped clients cost no local training.
        """
        count = min(self.policy.num_selected(wanted), self.data.train.num_clients)
        availability = self.population.availability
        online_now = (None if availability is None else
                      availability.online_at(self.data.train.num_clients, self.sim_time_s))
        selected = self.selector.select(round_index, count, online_now)
        stats.selected += len(selected)
        if len(selected) < self.policy.min_updates:  # nobody to train: wait for devices
            self.sim_time_s += IDLE_WAIT_S
            stats.skipped += 1
            log.warning("round %d skipped: %d client(s) online, systems.min_updates=%d",
                        round_index, len(selected), self.policy.min_updates)
            return [], {}
        seeds = [self._client_seed(round_index, client) for client in selected.tolist()]
        moved, samples = self.trainer.payloads(self.trainer.plan(selected.tolist(), seeds))
        seconds = client_seconds(self.population, selected, moved, samples, moved)
        online = (np.ones(len(selected), dtype=bool) if availability is None else
                  availability.online_throughout(selected, np.full(len(selected), self.sim_time_s),
                                                 self.sim_time_s + seconds))
        outcome = self.policy.admit(seconds, online, wanted)
        self.sim_time_s += outcome.duration_s
        stats.dropped += len(outcome.offline) + len(outcome.late)
        stats.stragglers += len(outcome.stragglers)
        if outcome.skipped:
            stats.skipped += 1
            survivors = len(selected) - len(outcome.offline) - len(outcome.late)
            log.warning("round %d skipped: %d update(s) survived, systems.min_updates=%d",
                        round_index, survivors, self.policy.min_updates)
            return [], {}
        # the server sees when every client that stayed online finished: stragglers report
        # after the round closed, late ones were still running at the deadline
        finished = np.concatenate([outcome.kept, outcome.stragglers, outcome.late])
        observed = np.minimum(seconds, self.policy.deadline_s or np.inf)[finished]
        durations = dict(zip(selected[finished].tolist(), observed.tolist(), strict=True))
        return selected[outcome.kept].tolist(), durations

    def _own(self, by_client: dict[int, Any]) -> dict[int, Any]:
        """The entries of this rank's clients (a checkpoint holds every rank's)."""
        return {client: value for client, value in by_client.items() if self.ranks.owns(client)}

    def _parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())

    def server_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state without client-local tables (what the server may keep) and
        without the placeholders of sharded ones (`shard_state_dict` holds those)."""
        left_out = list(self.local_tables.initial) if self.local_tables else []
        if self.server_tables.sharded:
            left_out = list(self.parts.tables)
        names = {id(p): name for name, p in self.module.named_parameters()}
        excluded = {names[id(self.parts.tables[table].weight)] for table in left_out}
        return {name: value for name, value in self.module.state_dict().items()
                if name not in excluded}

    def client_report(self) -> pl.DataFrame:
        """Per training client: raw id, train_rows, participation (rounds aggregated) and, from
        the last evaluation, test_rows and test_auc (null where it has no test rows)."""
        train = self.data.train
        frame = pl.DataFrame({"client": train.client_ids.numpy(),
                              "train_rows": train.client_sizes().numpy(),
                              "participation": self.participation})
        return frame.join(self.test_clients, on="client", how="left")

    def _client_seed(self, round_index: int, client: int) -> int:
        """Independent of the order in which a round's clients are trained."""
        return int(np.random.SeedSequence([self.seed, round_index, client]).generate_state(1)[0])

    def _evaluate(self, round_index: int, stats: RoundStats, started: float) -> dict[str, Any]:
        result = evaluate(self.module, self.parts, self.data.test, self.eval_batch_size,
                          self.data.train.client_ids, self.local_tables, self.ranks,
                          self.server_tables)
        metrics, self.test_clients = result.metrics, result.clients
        row = {
            "round": round_index,
            "wall_time_s": round(time.perf_counter() - started, 3),
            **metrics,
            "clients_seen": int((self.participation > 0).sum()),
            "train_loss": float(np.mean(stats.losses)) if stats.losses else float("nan"),
            "bytes_up_per_round": stats.bytes_up // max(stats.rounds, 1),
            "bytes_down_per_round": stats.bytes_down // max(stats.rounds, 1),
            "rejected": stats.rejected,
            "crashed": stats.crashed,
        }
        if self.population is not None:
            row.update(sim_time_s=round(self.sim_time_s, 3), dropped=stats.dropped,
                       stragglers=stats.stragglers, skipped_rounds=stats.skipped)
        self.history.append(row)
        self.on_evaluation(row)
        return row


def _merged_by_client(parts: list[Any] | None, depth: int) -> Any:
    """The union of the ranks' parts of a state keyed by client ({client: ...} at depth 1,
    {table: {client: ...}} at depth 2); each rank holds its own clients, so keys are disjoint.
    None where the parts were not gathered (ranks other than 0)."""
    if parts is None:
        return None
    if parts[0] is None or len(parts) == 1:
        return parts[0]
    if depth == 1:
        return {client: value for part in parts for client, value in part.items()}
    return {key: _merged_by_client([part[key] for part in parts], depth - 1)
            for key in parts[0]}
