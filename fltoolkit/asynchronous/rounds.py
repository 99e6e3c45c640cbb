"""The asynchronous server's aggregations on the loop's parts: the timeline decides, this
trains the clients it names and holds their updates until they are aggregated.

At each aggregation the clients that started from the current model version (`to_train`)
train as one cohort, with the plan of that version (`planner.plan_round(version, clients)`:
the plan whose bytes and samples priced their run times in the timeline, through the same
`cohort_seconds` as synchronous admission). Their updates are kept by client (the timeline
gives each client at most one outstanding) as standalone tensors, so an update aggregated
now, or after a resume, is the same object either way. What a client keeps locally (its
local-table rows, its optimizer state) is held with its update and stored only once the
server aggregates it, as in synchronous rounds: a client whose update is rejected, crashes or
is dropped as too stale keeps nothing of that run. It cannot train again before then (it is
busy until its update is consumed), so holding the state changes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from torch import nn

from fltoolkit.asynchronous.policy import AsyncPolicy
from fltoolkit.asynchronous.records import Aggregation
from fltoolkit.asynchronous.timeline import AsyncTimeline
from fltoolkit.reports.staleness import staleness_counts
from fltoolkit.run.ranks import Ranks
from fltoolkit.selection.base import ClientSelector
from fltoolkit.systems.clock import cohort_seconds
from fltoolkit.systems.devices import DevicePopulation
from fltoolkit.training.cohort import CohortPlanner
from fltoolkit.training.optimizer_state import ClientOptimizerStates
from fltoolkit.training.trainer import ClientState, CohortTrainer
from fltoolkit.training.updates import ClientUpdate, SparseRows


@dataclass(frozen=True)
class DueAggregation:
    """An aggregation the timeline reached, with the updates it consumes.

    Attributes:
        aggregation: the timeline's record (clock, version, buffered arrivals, losses).
        updates: the buffered clients' updates, in arrival order (not yet scaled).
        stale: the updates dropped as staler than max_staleness (arrived, never aggregated).
    """

    aggregation: Aggregation
    updates: list[ClientUpdate]
    stale: list[ClientUpdate]

    def weights(self) -> dict[int, float]:
        """Each buffered client's staleness weight w(s)."""
        return {arrival.client: arrival.weight for arrival in self.aggregation.buffered}

    def durations(self) -> dict[int, float]:
        """Simulated seconds of every arrived run (the selector's feedback: Oort)."""
        arrived = self.aggregation.buffered + self.aggregation.dropped_stale
        return {arrival.client: arrival.arrival_s - arrival.start_s for arrival in arrived}

    def columns(self) -> dict[str, Any]:
        """The asynchronous columns of rounds.csv: the buffered updates' staleness (summed up,
        and counted by value in `staleness_counts`) and the updates dropped as too stale."""
        staleness = [arrival.staleness for arrival in self.aggregation.buffered]
        return {"mean_staleness": round(float(np.mean(staleness)), 4),
                "max_staleness": max(staleness),
                "dropped_stale": len(self.aggregation.dropped_stale),
                "staleness_counts": staleness_counts(staleness)}


class AsyncRounds:
    """The timeline, lazy training and the updates in flight.

    Args:
        policy: concurrency, buffer size, staleness weights and limit.
        planner: plans cohorts (seeds from (seed, model version, client)).
        trainer: trains cohorts from the current global model.
        selector: fills free slots among the clients online and not busy.
        population: the simulated devices (run times; availability: when clients go offline).
        ranks: the processes sharing the training: each trains its own clients of `to_train`
            and every rank receives every update (the timeline runs identically on each);
            a client's local state stays on the rank that owns it.
    """

    def __init__(self, policy: AsyncPolicy, planner: CohortPlanner, trainer: CohortTrainer,
                 selector: ClientSelector, population: DevicePopulation,
                 ranks: Ranks | None = None) -> None:
        self.planner, self.trainer, self.selector = planner, trainer, selector
        self.ranks = ranks or Ranks()
        self.population = population
        self.num_clients = planner.data.num_clients
        availability = population.availability
        self.timeline = AsyncTimeline(
            policy, self._select, self._seconds,
            None if availability is None else availability.session_end)
        self.updates: dict[int, ClientUpdate] = {}
        self.states: dict[int, ClientState] = {}

    def next_aggregation(self) -> DueAggregation:
        """Run the clock to the next aggregation; train the clients that started from the
        current version; hand over the updates it consumes."""
        aggregation = self.timeline.advance()
        if aggregation.to_train:
            mine = [client for client in aggregation.to_train if self.ranks.owns(client)]
            trained = self.trainer.train_round(self.planner.plan_round(aggregation.version, mine))
            for update in self.ranks.cohort_updates(aggregation.to_train, trained,
                                                    self.trainer.dense_size):
                self.updates[update.client] = standalone(update)
            self.states.update(self.trainer.pending)
            self.trainer.pending = {}
        return DueAggregation(aggregation,
                              [self.updates.pop(a.client) for a in aggregation.buffered],
                              [self.updates.pop(a.client) for a in aggregation.dropped_stale])

    def settle(self, due: DueAggregation, accepted: list[int]) -> None:
        """The consumed clients' local state (those of this rank): stored for the aggregated
        ones, else dropped."""
        consumed = [a.client for a in due.aggregation.buffered + due.aggregation.dropped_stale]
        held = {client: self.states.pop(client) for client in consumed if client in self.states}
        self.trainer.commit({client: held[client] for client in accepted if client in held})

    def _select(self, now_s: float, free: int, busy: frozenset[int]) -> list[int]:
        availability = self.population.availability
        available = (np.ones(self.num_clients, dtype=bool) if availability is None
                     else availability.online_at(self.num_clients, now_s))
        available[list(busy)] = False
        return self.selector.select(self.timeline.version + 1, free, available).tolist()

    def _seconds(self, clients: list[int], version: int) -> np.ndarray:
        return cohort_seconds(self.population, self.planner.plan_round(version, clients))

    def state_dict(self, parameters: list[nn.Parameter]) -> dict[str, Any]:
        """The timeline and the updates and client states in flight, as plain tensors and
        numbers (`parameters`: the module's, which key optimizer state)."""
        optimizers = ClientOptimizerStates()
        optimizers.states = {client: state.optimizer for client, state in self.states.items()
                             if state.optimizer is not None}
        return {"timeline": self.timeline.state_dict(),
                "updates": [_plain_update(update) for update in self.updates.values()],
                "local_rows": {client: {name: (rows.ids.clone(), rows.values.clone())
                                        for name, rows in state.local_rows.items()}
                               for client, state in self.states.items()},
                "optimizers": optimizers.state_dict(parameters)}

    def load_state_dict(self, state: dict[str, Any], parameters: list[nn.Parameter]) -> None:
        self.timeline.load_state_dict(state["timeline"])
        self.updates = {}
        for plain in state["updates"]:
            update = _update(plain)
            self.updates[update.client] = update
        optimizers = ClientOptimizerStates()
        optimizers.load_state_dict(state["optimizers"], parameters)
        self.states = {client: ClientState({name: SparseRows(*pair) for name, pair in rows.items()},
                                           optimizers.states.get(client))
                       for client, rows in state["local_rows"].items()
                       if self.ranks.owns(client)}  # a checkpoint holds every rank's


def standalone(update: ClientUpdate) -> ClientUpdate:
    """The update with tensors of its own: not views of its cohort's buffers, which would
    stay alive with it (and be saved whole in a checkpoint)."""
    return replace(update, dense=update.dense.clone(),
                   tables={name: SparseRows(rows.ids.clone(), rows.values.clone())
                           for name, rows in update.tables.items()})


def _plain_update(update: ClientUpdate) -> dict[str, Any]:
    plain = {f.name: getattr(update, f.name) for f in fields(update)
             if f.name not in ("tables", "whole")}
    plain["tables"] = {name: tuple(rows) for name, rows in update.tables.items()}
    return plain


def _update(plain: dict[str, Any]) -> ClientUpdate:
    tables = {name: SparseRows(*pair) for name, pair in plain["tables"].items()}
    return ClientUpdate(**{**plain, "tables": tables})

