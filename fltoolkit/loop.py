"""FederatedLoop: one round, top to bottom, and the rounds of a run.

A round: select clients -> admit them (simulated devices: who is online, fast enough, in
time) -> train the admitted cohort from the current global weights -> gate the updates
(faults, non-finite, norm outliers) -> aggregate with the strategy -> feed back to the
selector -> every `eval_interval` rounds, evaluate. Each step returns its result; the round
adds them into one `RoundRow`. The global model is the LightningModule itself: a round's
clients train on it in turn and leave it as they found it (see CohortTrainer).

In async mode (`federated.mode async`, FedBuff) a round is one aggregation: the timeline
(fltoolkit.asynchronous) runs the simulated clock to the next full buffer and trains the
clients that started from the current model -> gate the buffered updates -> scale each by its
staleness weight -> aggregate -> feed back, with the same evaluation and checkpoint cadence.

Checkpoints, resuming and stopping on signals live in `fltoolkit.run.checkpointing`.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import polars as pl
import torch

from datamodules.base import PreparedData
from datamodules.clients import ClientTable
from fltoolkit.asynchronous.rounds import AsyncRounds
from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.embeddings.runtime import BudgetedTables
from fltoolkit.gate import UpdateGate
from fltoolkit.privacy.config import PrivacyConfig
from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.privacy.plan import PrivacyPlan
from fltoolkit.run.checkpointing import RunInterrupted
from fltoolkit.run.config import FederatedConfig
from fltoolkit.run.ranks import Ranks
from fltoolkit.server.aggregation import aggregate_or_roll_back
from fltoolkit.server.evaluation import Evaluation, evaluate
from fltoolkit.server.held_out import HeldOutTest
from fltoolkit.server.tables import ServerTables, ShardedServerTables
from fltoolkit.strategies.base import RoundFailed
from fltoolkit.systems.admission import Admitted, admission_for
from fltoolkit.systems.config import SystemsConfig
from fltoolkit.training.cohort import CohortPlanner
from fltoolkit.training.optimizer_state import ClientOptimizerStates
from fltoolkit.training.updates import ClientUpdate
from fltoolkit.training.vectorized import trainer_for
from recsys.parts import split_parameters
from recsys.sharding import ShardedTables

log = logging.getLogger("fltk")

# training_step calls self.log, which has no trainer to report to inside the loop.
warnings.filterwarnings("ignore", message=".*self.log.*trainer. reference is not registered.*")


@dataclass(frozen=True)
class RoundRow:
    """What rounds did, counted; rows add up (the rounds since an evaluation, a whole run).
    The fields from `selected` to `rows_up` are the columns of rounds.csv (`failed`: rounds
    whose aggregation protocol gave no aggregate; `rows_up`: row deltas the server received,
    each client's or, under secure aggregation, the summed union)."""

    rounds: int = 0
    selected: int = 0
    clients: int = 0
    aggregated: int = 0
    rejected: int = 0
    crashed: int = 0
    dropped: int = 0
    stragglers: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rows_up: int = 0
    losses: tuple[float, ...] = ()  # training losses of the aggregated clients

    def __add__(self, other: RoundRow) -> RoundRow:
        return RoundRow(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                           for f in fields(self)})

    def counters(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("rounds", "losses")}

    def per_round(self, key: str) -> int:
        return getattr(self, key) // max(self.rounds, 1)


@dataclass(frozen=True)
class LoopHooks:
    """What the run does with the loop's results (all optional).

    Attributes:
        on_round: each round's row (rounds.csv): its counters, wall time and, with simulated
            devices, its simulated length and the clock.
        on_evaluation: each evaluation's metrics row (metrics.csv): validation metrics, or
            test metrics for data without a validation split.
        on_checkpoint: (the loop, the round) after every `checkpoint_interval`-th round, the
            last one, and the one a stop was requested in.
        on_progress: (round, its evaluation row or None) after every round.
    """

    on_round: Callable[[dict[str, Any]], None] = lambda row: None
    on_evaluation: Callable[[dict[str, Any]], None] = lambda row: None
    on_checkpoint: Callable[[FederatedLoop, int], None] = lambda loop, round_index: None
    on_progress: Callable[[int, dict[str, Any] | None], None] = lambda index, row: None


class FederatedLoop:
    """Runs `config.rounds` rounds of federated training of `module` on `data`.

    Args:
        module: the LightningModule, already built for the data's features.
        data: the prepared splits: training clients, validation rows (evaluated during
            training) and test rows (held out; see fltoolkit.server.held_out).
        config: the federated section of the experiment.
        seed: the run's seed (selection, local batch order and faults derive from it).
        eval_batch_size: rows per evaluation batch.
        systems: simulated devices and round policy; None or disabled: every selected client
            is aggregated and there is no clock.
        ranks: the processes sharing the cohort (fltoolkit.run.ranks); one by default.
        sharded_tables: the module's tables, sharded across `ranks` (recsys.sharding
            `shard_module_tables`); None: the module holds them whole.
        hooks: what to do with rounds, evaluations and checkpoints.
        privacy: differential privacy and secure aggregation around the strategy; None: off.
        embeddings: shared tables under a memory budget (the module built for it with
            fltoolkit.embeddings.configure_budgeted_features); None or method none: whole.
    """

    def __init__(self, module: torch.nn.Module, data: PreparedData, config: FederatedConfig,
                 seed: int, *, eval_batch_size: int = 65536, systems: SystemsConfig | None = None,
                 ranks: Ranks | None = None, sharded_tables: ShardedTables | None = None,
                 hooks: LoopHooks | None = None, privacy: PrivacyConfig | None = None,
                 embeddings: EmbeddingBudgetConfig | None = None) -> None:
        self.module, self.data, self.config, self.seed = module, data, config, seed
        self.eval_batch_size = eval_batch_size
        self.ranks = ranks or Ranks()
        self.hooks = hooks or LoopHooks()
        if sharded_tables is None:  # sharded tables stay where TorchRec placed them
            module.to(config.device)
        self.parts = split_parameters(module, data.features.sparse)
        num_clients = data.train.num_clients
        config.check_clients(num_clients)
        privacy = privacy or PrivacyConfig()
        devices = bool(systems and systems.enabled)
        config.check_mode(devices=devices, privacy=privacy.enabled)
        local = config.local_table_names(list(self.parts.tables), sharded_tables is not None)
        self.local_tables = (LocalTableStore({n: self.parts.tables[n].weight for n in local})
                             if local else None)
        self.server_tables = (ShardedServerTables(sharded_tables) if sharded_tables else
                              ServerTables({name: part.weight.detach()
                                            for name, part in self.parts.tables.items()
                                            if name not in local}))
        self.selector = config.selector
        self.selector.bind(num_clients, seed)
        self.privacy = PrivacyPlan.for_run(privacy, config, num_clients, devices=devices,
                                           sharded=sharded_tables is not None)
        self.strategy = self.privacy.strategy
        self.budget = self._budgeted_tables(embeddings or EmbeddingBudgetConfig(), local,
                                            privacy=privacy.enabled)
        self.admission = admission_for(systems, num_clients, seed)
        self.planner = CohortPlanner(
            data.train, self.parts.tables, config.schedule(),
            uploaded=[name for name in self.parts.tables if name not in local],
            dense=self.parts.dense, seed=seed, uploads=self.strategy.planned_upload_bytes,
            row_maps=self.budget.maps if self.budget else None)
        self.trainer = trainer_for(module, config)(
            module, self.parts, self.server_tables, proximal_mu=config.proximal_mu,
            local_tables=self.local_tables,
            optimizer_states=ClientOptimizerStates() if config.keep_optimizer_state else None)
        self.gate = UpdateGate(seed, config.faults, config.reject_norm_ratio,
                               uploads=self.strategy.uploads)
        self.asynchronous = (AsyncRounds(config.async_policy(), self.planner, self.trainer,
                                         self.selector, self.admission.population, self.ranks)
                             if config.mode == "async" else None)
        self.participation = np.zeros(num_clients, dtype=np.int64)
        self.history: list[dict[str, Any]] = []
        self.completed_rounds, self.wall_time_s = 0, 0.0
        self.since_evaluation, self.totals = RoundRow(), RoundRow()
        self.last: dict[str, Any] = {}
        self.stop_requested = False
        self.budget_spent_after: int | None = None  # the last round privacy.target_epsilon allowed
        self.held_out = HeldOutTest()
        self.test_clients = pl.DataFrame(schema={"client": pl.Int64, "test_rows": pl.Int64,
                                                 "test_auc": pl.Float64})
        if data.validation is None and self.ranks.is_main:
            log.warning("the data has no validation split: evaluations during training score "
                        "the test split, so settings chosen on them are tuned on test")

    def _budgeted_tables(self, embeddings: EmbeddingBudgetConfig, local: list[str], *,
                         privacy: bool) -> BudgetedTables | None:
        """The shared tables' row maps under `embeddings`; None with whole tables."""
        embeddings.check_run(self.config, privacy=privacy)
        if not embeddings.enabled:
            return None
        shared = {name: part for name, part in self.parts.tables.items() if name not in local}
        return BudgetedTables(embeddings, shared, self.data.features.cardinalities,
                              self.data.train, self.seed)

    def run(self) -> dict[str, Any]:
        """Train the remaining rounds (all of them unless resumed from a checkpoint); returns
        the last evaluation's row with the run's totals. Raises RunInterrupted after the
        checkpoint of the round in which `stop_requested` was set (e.g. by a signal)."""
        log.info("strategy:\n%s", self.strategy.summary())
        with frozen_heap():
            return self._run_rounds()

    def _run_rounds(self) -> dict[str, Any]:
        started = time.perf_counter() - self.wall_time_s
        step = self.run_round if self.asynchronous is None else self.run_aggregation
        for round_index in range(self.completed_rounds + 1, self.config.rounds + 1):
            if not self.privacy.allows(round_index):
                self._stop_at_budget(round_index, started)
                break
            self.since_evaluation += step(round_index)
            evaluated = None
            if round_index % self.config.eval_interval == 0 or round_index == self.config.rounds:
                evaluated = self.last = self._evaluate(round_index, started)
                self.totals, self.since_evaluation = self.totals + self.since_evaluation, RoundRow()
            self.completed_rounds = round_index
            self.wall_time_s = time.perf_counter() - started
            self.hooks.on_progress(round_index, evaluated)
            stop = self.ranks.any(self.stop_requested)  # every rank stops after the same round
            if (round_index % self.config.checkpoint_interval == 0
                    or round_index == self.config.rounds or stop):
                self.hooks.on_checkpoint(self, round_index)
            if stop and round_index < self.config.rounds:
                raise RunInterrupted(round_index)
        return self._final_row()

    def _stop_at_budget(self, round_index: int, started: float) -> None:
        """End the run before `round_index`, which would spend more than the privacy budget:
        the rounds since the last evaluation are evaluated and checkpointed."""
        done = self.budget_spent_after = round_index - 1
        log.warning("round %d would take epsilon to %.3f, past privacy.target_epsilon %s: the "
                    "run stops after round %d", round_index, self.privacy.epsilon(round_index),
                    self.privacy.config.target_epsilon, done)
        if self.last.get("round") != done:
            self.last = self._evaluate(done, started)
            self.totals, self.since_evaluation = self.totals + self.since_evaluation, RoundRow()
            self.hooks.on_checkpoint(self, done)

    def run_round(self, round_index: int) -> RoundRow:
        """One round: select and admit, then train, gate, aggregate and feed back."""
        started = time.perf_counter()
        admitted = self.admission.admit(round_index, self.config.clients_per_round,
                                        self.selector, self.planner.plan_round)
        row = RoundRow(rounds=1, selected=admitted.selected, dropped=admitted.dropped,
                       stragglers=admitted.stragglers, skipped=int(admitted.skipped))
        accepted: list[ClientUpdate] = []
        if admitted.cohort.clients:
            trained, accepted = self._train_and_aggregate(round_index, admitted)
            row += trained
        budget = ({} if self.budget is None else
                  self.budget.end_round(round_index, admitted.cohort, accepted,
                                        self.server_tables.owned(), self.strategy))
        timing = {"round_wall_s": round(time.perf_counter() - started, 4)}
        if self.admission.sim_time_s is not None:
            timing.update(round_duration_s=round(admitted.seconds, 3),
                          sim_time_s=round(self.admission.sim_time_s, 3))
        self.hooks.on_round({"round": round_index, **row.counters(), **budget, **timing})
        return row

    def _train_and_aggregate(self, round_index: int, admitted: Admitted
                             ) -> tuple[RoundRow, list[ClientUpdate]]:
        """Train this rank's share of the cohort, gate every update, let the accepted clients
        keep their state, aggregate and feed back; (the round's counts, the accepted)."""
        cohort = admitted.cohort
        self.strategy.start_round(round_index, list(cohort.clients), self.seed)
        mine = cohort.subset([slot for slot, client in enumerate(cohort.clients)
                              if self.ranks.owns(client)])
        trained = self.trainer.train_round(mine)
        updates = self.ranks.cohort_updates(cohort.clients, trained, self.trainer.dense_size)
        screened = self.gate.screen(updates, round_index)
        accepted = screened.accepted
        self.trainer.keep([u.client for u in accepted if self.ranks.owns(u.client)])
        self.participation[cohort.clients] += 1
        row = RoundRow(clients=len(cohort.clients), aggregated=len(accepted),
                       rejected=screened.rejected, crashed=screened.crashed,
                       bytes_up=screened.bytes_up, bytes_down=screened.bytes_down,
                       rows_up=screened.rows_up, losses=tuple(update.loss for update in accepted))
        row += self._aggregate(round_index, accepted, accepted, admitted.durations)
        return row, accepted

    def run_aggregation(self, round_index: int) -> RoundRow:
        """Async mode's round: the timeline's next aggregation (its clients that started from
        the current model train now), then gate, scale by staleness, aggregate, feed back."""
        started = time.perf_counter()
        previous_s = self.admission.sim_time_s
        due = self.asynchronous.next_aggregation()
        aggregation = due.aggregation
        self.participation[aggregation.to_train] += 1
        self.strategy.start_round(round_index, [u.client for u in due.updates], self.seed)
        screened = self.gate.screen(due.updates, round_index)
        accepted = screened.accepted
        self.asynchronous.settle(due, [u.client for u in accepted])
        stale = self.gate.uploads(due.stale)
        row = RoundRow(rounds=1, selected=aggregation.started, clients=len(aggregation.to_train),
                       aggregated=len(accepted), rejected=screened.rejected,
                       crashed=screened.crashed, dropped=len(aggregation.lost),
                       bytes_up=screened.bytes_up + stale.bytes,
                       bytes_down=screened.bytes_down + sum(u.download_bytes for u in due.stale),
                       rows_up=screened.rows_up + stale.rows,
                       losses=tuple(update.loss for update in accepted))
        weights = due.weights()
        row += self._aggregate(round_index, [u.scaled(weights[u.client]) for u in accepted],
                               accepted, due.durations())
        self.admission.sim_time_s = aggregation.clock_s  # the run's clock is the timeline's
        self.hooks.on_round({"round": round_index, **row.counters(),
                             "round_wall_s": round(time.perf_counter() - started, 4),
                             "round_duration_s": round(aggregation.clock_s - previous_s, 3),
                             "sim_time_s": round(aggregation.clock_s, 3), **due.columns()})
        return row

    def _aggregate(self, round_index: int, updates: list[ClientUpdate],
                   accepted: list[ClientUpdate], durations: dict[int, float] | None) -> RoundRow:
        """Apply the strategy to `updates` (the accepted ones, in async mode scaled by their
        staleness weights) and feed the `accepted` ones back to the selector."""
        row = RoundRow()
        if not accepted:
            log.warning("round %d: no valid update, the global model is unchanged", round_index)
            return row
        try:
            applied = aggregate_or_roll_back(self.strategy, updates, self.parts.dense,
                                             self.server_tables, self.ranks)
        except RoundFailed as failed:
            log.warning("round %d: %s; the global model is unchanged", round_index, failed)
            return row + RoundRow(failed=1)
        if not applied:
            row += RoundRow(skipped=1)
            log.warning("round %d: aggregation gave NaN/Inf weights; the round's update was "
                        "discarded (lower the server learning rate or use a robust strategy)",
                        round_index)
        self.selector.feedback(round_index, accepted, durations)
        return row

    def _evaluate(self, round_index: int, started: float) -> dict[str, Any]:
        """Score the validation split (reported) and the test split (held out)."""
        test = self._score(self.data.test, round_index)
        self.test_clients = test.clients
        result = test
        if self.data.validation is not None:
            result = self._score(self.data.validation, round_index)
            self.held_out.observe(round_index, result.metrics, test.metrics)
        rounds = self.since_evaluation
        row = {
            "round": round_index,
            "wall_time_s": round(time.perf_counter() - started, 3),
            **result.metrics,
            "clients_seen": int((self.participation > 0).sum()),
            "train_loss": float(np.mean(rounds.losses)) if rounds.losses else float("nan"),
            "bytes_up_per_round": rounds.per_round("bytes_up"),
            "bytes_down_per_round": rounds.per_round("bytes_down"),
            "rejected": rounds.rejected,
            "crashed": rounds.crashed,
        }
        epsilon = self.privacy.epsilon(round_index)
        if epsilon is not None:
            row["epsilon"] = round(epsilon, 4)
        if self.admission.sim_time_s is not None:
            row.update(sim_time_s=round(self.admission.sim_time_s, 3), dropped=rounds.dropped,
                       stragglers=rounds.stragglers, skipped_rounds=rounds.skipped)
        self.history.append(row)
        self.hooks.on_evaluation(row)
        return row

    def _score(self, split: ClientTable, round_index: int) -> Evaluation:
        """The global model's metrics on a split; a model whose outputs are not finite has
        diverged and stops the run (its metrics would be NaN from then on)."""
        if self.budget is not None:
            split = self.budget.mapped(split)
        result = evaluate(self.module, self.parts, split, self.eval_batch_size,
                          self.data.train.client_ids, self.local_tables, self.ranks,
                          self.server_tables)
        if result.non_finite:
            raise FloatingPointError(
                f"round {round_index}: the global model gives non-finite logits on "
                f"{result.non_finite} of {split.num_rows} rows, so training diverged; lower "
                "the learning rates (model.dense_optimizer, model.sparse_optimizer, the "
                "strategy's server_lr) or set federated.reject_norm_ratio")
        return result

    def _final_row(self) -> dict[str, Any]:
        """The last evaluation with the run's totals (summary.json)."""
        totals = self.totals
        final = dict(self.last)
        final.update(bytes_up_total=totals.bytes_up, bytes_down_total=totals.bytes_down,
                     bytes_up_per_round=totals.per_round("bytes_up"),
                     bytes_down_per_round=totals.per_round("bytes_down"),
                     rejected_total=totals.rejected, failed_total=totals.failed)
        if self.admission.sim_time_s is not None:
            final.update(sim_time_s=round(self.admission.sim_time_s, 3))
        final.update(self.held_out.summary(self.last))
        if self.budget_spent_after is not None:
            target = self.privacy.config.target_epsilon
            final["stopped_early"] = (f"privacy budget: the next round would take epsilon past "
                                      f"{target}; stopped after round {self.budget_spent_after}")
        return final

    def server_learns(self) -> dict[str, Any]:
        """What crossed from the clients to the server over the run (summary.json)."""
        local = list(self.local_tables.initial) if self.local_tables else []
        uploaded = [name for name in self.parts.tables if name not in local]
        totals = self.totals + self.since_evaluation
        return {**self.privacy.statement(uploaded, local, self.completed_rounds),
                "rows_received_per_round": totals.per_round("rows_up"),
                "bytes_received_per_round": totals.per_round("bytes_up")}

    def embedding_rows(self) -> dict[str, Any]:
        """summary.json: the rows the tables hold (physical) and the ids they embed (logical),
        over all tables, and the budget's settings."""
        cardinalities = self.data.features.cardinalities
        logical = sum(max(cardinalities[c] for c in part.columns)
                      for part in self.parts.tables.values())
        config = self.budget.config if self.budget else EmbeddingBudgetConfig()
        return {"embedding_rows": sum(part.num_rows for part in self.parts.tables.values()),
                "embedding_rows_logical": logical, "embedding_method": config.method,
                "embedding_budget": config.budget, "embedding_scope": config.scope}

    def client_report(self) -> pl.DataFrame:
        """Per training client: raw id, train_rows, participation (rounds trained) and, from
        the last evaluation's test split, test_rows and test_auc (null where it has no test
        rows); written once the run ends, since test results are held out until then."""
        train = self.data.train
        frame = pl.DataFrame({"client": train.client_ids.numpy(),
                              "train_rows": train.client_sizes().numpy(),
                              "participation": self.participation})
        return frame.join(self.test_clients, on="client", how="left")

    def request_stop(self) -> None:
        """Stop after the current round, once its checkpoint is written (signal handlers)."""
        self.stop_requested = True


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Hide the objects alive now (the module, the data, the run's state) from Python's
    cyclic garbage collector while rounds run. A round of 1000 clients makes tens of
    thousands of short-lived objects, so collections are frequent, and each full one walked
    the whole heap: a quarter of such a round's time before this (gc.freeze)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
