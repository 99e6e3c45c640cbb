"""The asynchronous server's timeline on the simulated clock (FedBuff, Nguyen et al., AISTATS
2022): `concurrency` clients train at every moment, and every `buffer_size` arrived updates
are aggregated. A pure event simulation: it decides who trains from which model version and
when updates arrive and are aggregated; the caller trains and aggregates.

Lazy training. A client's update depends only on the model version it starts from (and on
its data and seed), and the model changes only at aggregations, so every client started
since the last aggregation starts from the current version. They are trained together, as
one cohort, at the next aggregation, just before the model changes (`Aggregation.to_train`);
only their updates are kept until they arrive, never a model per client in flight. A
client's run time and whether it goes offline are known when it starts (the plan prices its
bytes and samples before training; the availability trace says when its session ends), so a
lost client is never trained. An update later dropped as too stale was trained, as the real
client would have; the one simulated waste is that the clients still in flight at a run's
last aggregation are trained too (the caller may skip those that are not buffered).

Busy clients. A client is busy from its start until its update is consumed (aggregated or
dropped as too stale) or lost, and is not selected meanwhile. So it has at most one update
outstanding: it trains at most once from each model version ((client, start version) names
every update), its kept local state passes from one run to the next in order, and the caller
can key the updates it keeps by client. For the slots to stay full, a little more than
concurrency + buffer_size clients must be online.

Events: a client's arrival or loss, and a retry after a selection came up short. The events
of one instant are handled in (kind: arrival, loss, retry; client) order; an aggregation
happens as soon as an arrival fills the buffer; free slots are filled once every event of the
instant has been handled, so replacements start from the newest model.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import astuple
from typing import Any

import numpy as np

from fltoolkit.asynchronous.policy import AsyncPolicy
from fltoolkit.asynchronous.records import Aggregation, Arrival, Job

# (now, free slots, busy clients) -> at most that many clients, online now and not busy
Select = Callable[[float, int, frozenset[int]], Sequence[int]]
# (clients, the model version they start from) -> simulated seconds of each client's run
Seconds = Callable[[list[int], int], Sequence[float]]
# (clients, now) -> when each goes offline, later than now (inf: it stays online)
OfflineAt = Callable[[list[int], float], Sequence[float]]

ARRIVAL, LOSS, RETRY = 0, 1, 2  # event kinds, in the order the events of one instant run
NO_CLIENT = -1  # the client of a retry


class AsyncTimeline:
    """Clients in flight, the buffer of arrived updates and the simulated clock.

    Args:
        policy: concurrency, buffer size, staleness weights and limit, idle wait.
        select: picks the clients that fill free slots (the caller's selector).
        seconds: each started client's simulated run time: download, local training, upload
            (the caller's plan and devices).
        offline_at: when each started client goes offline; one that goes offline before its
            run ends is lost at that time. None: clients stay online.
    """

    def __init__(self, policy: AsyncPolicy, select: Select, seconds: Seconds,
                 offline_at: OfflineAt | None = None) -> None:
        self.policy, self.select = policy, select
        self.seconds, self.offline_at = seconds, offline_at
        self.clock_s, self.version, self.started = 0.0, 0, 0
        self.in_flight: dict[int, Job] = {}
        self.buffer: list[Arrival] = []
        self.dropped_stale: list[Arrival] = []
        self.lost: list[Job] = []
        self.retry_at: float | None = None
        self._events: list[tuple[float, int, int]] = []

    def advance(self) -> Aggregation:
        """Run the clock to the next aggregation and return it; the model version is
        incremented (the caller trains and aggregates before calling again). While the
        selection finds nobody the clock moves on by `idle_wait_s`: a population in which no
        client is ever online never aggregates, so the caller's selection must notice it."""
        while True:
            if not self._events or self._events[0][0] > self.clock_s:
                self._fill()
            self.clock_s, kind, client = heapq.heappop(self._events)
            if kind == RETRY:
                self.retry_at = None
            elif kind == LOSS:
                self.lost.append(self.in_flight.pop(client))
            elif self._arrive(self.in_flight.pop(client)):
                return self._aggregate()

    def _fill(self) -> None:
        """Start clients in the free slots; if the selection finds too few, retry later."""
        free = self.policy.concurrency - len(self.in_flight)
        if free == 0:
            return
        busy = frozenset(self.in_flight).union(
            update.client for update in self.buffer + self.dropped_stale)
        clients = sorted(int(client) for client in self.select(self.clock_s, free, busy))
        if len(clients) > free or len(set(clients)) < len(clients) or busy.intersection(clients):
            raise ValueError(f"the selection must give at most {free} distinct clients that are "
                             f"not busy; it gave {clients}, busy among them: "
                             f"{sorted(busy.intersection(clients))}")
        if clients:
            self._start(clients)
        if len(clients) < free and self.retry_at is None:
            self._schedule_retry(self.clock_s + self.policy.idle_wait_s)

    def _start(self, clients: list[int]) -> None:
        """Put `clients` in flight from the current version, arriving or lost as their run
        time and availability say."""
        seconds = np.asarray(self.seconds(clients, self.version), dtype=np.float64)
        if seconds.shape != (len(clients),) or not np.all(np.isfinite(seconds) & (seconds >= 0)):
            raise ValueError(f"run times must be finite and >= 0, one per client; got "
                             f"{seconds.tolist()} for clients {clients}")
        offline = (np.full(len(clients), np.inf) if self.offline_at is None else
                   np.asarray(self.offline_at(clients, self.clock_s), dtype=np.float64))
        if offline.shape != (len(clients),) or not np.all(offline > self.clock_s):
            raise ValueError(f"started clients must stay online past the start "
                             f"({self.clock_s} s); got offline times {offline.tolist()} for "
                             f"clients {clients}")
        ends = (self.clock_s + seconds).tolist()
        for client, end, gone in zip(clients, ends, offline.tolist(), strict=True):
            arrives = gone >= end
            self._put_in_flight(Job(client, self.version, self.clock_s,
                                    end if arrives else gone, arrives))
        self.started += len(clients)

    def _schedule_retry(self, at_s: float) -> None:
        self.retry_at = at_s
        heapq.heappush(self._events, (at_s, RETRY, NO_CLIENT))

    def _put_in_flight(self, job: Job) -> None:
        self.in_flight[job.client] = job
        heapq.heappush(self._events, (job.end_s, ARRIVAL if job.arrives else LOSS, job.client))

    def _arrive(self, job: Job) -> bool:
        """Buffer an arrived update (or drop it as too stale); whether the buffer is full."""
        staleness = self.version - job.start_version
        arrival = Arrival(job.client, job.start_version, job.start_s, job.end_s, staleness,
                          self.policy.staleness(staleness))
        if self.policy.too_stale(staleness):
            self.dropped_stale.append(arrival)
            return False
        self.buffer.append(arrival)
        return len(self.buffer) == self.policy.buffer_size

    def _aggregate(self) -> Aggregation:
        """The full buffer's aggregation: who trains from the current version before it
        changes (the arriving ones started from it: in flight, or buffered just now)."""
        version = self.version
        to_train = sorted([job.client for job in self.in_flight.values()
                           if job.arrives and job.start_version == version] +
                          [update.client for update in self.buffer
                           if update.start_version == version])
        aggregation = Aggregation(version, self.clock_s, to_train, self.buffer,
                                  self.dropped_stale, self.lost, self.started)
        self.buffer, self.dropped_stale, self.lost, self.started = [], [], [], 0
        self.version += 1
        return aggregation

    def state_dict(self) -> dict[str, Any]:
        """Everything the continuation depends on, as plain numbers and lists (JSON-safe);
        the event queue is rebuilt from the runs in flight and the pending retry."""
        return {"clock_s": self.clock_s, "version": self.version, "started": self.started,
                "retry_at": self.retry_at,
                "in_flight": [list(astuple(job)) for job in self.in_flight.values()],
                "buffer": [list(astuple(update)) for update in self.buffer],
                "dropped_stale": [list(astuple(update)) for update in self.dropped_stale],
                "lost": [list(astuple(job)) for job in self.lost]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock_s, self.version = float(state["clock_s"]), int(state["version"])
        self.started, self.retry_at = int(state["started"]), None
        self.in_flight, self._events = {}, []
        for row in state["in_flight"]:
            self._put_in_flight(Job(*row))
        if state["retry_at"] is not None:
            self._schedule_retry(float(state["retry_at"]))
        self.buffer = [Arrival(*row) for row in state["buffer"]]
        self.dropped_stale = [Arrival(*row) for row in state["dropped_stale"]]
        self.lost = [Job(*row) for row in state["lost"]]
