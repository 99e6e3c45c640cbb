"""What the asynchronous timeline keeps and reports: clients in flight, arrived updates and
aggregations. Plain frozen records, so a checkpoint holds them as tuples of numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """A client's run: started at `start_s` from model version `start_version`, it either
    arrives at `end_s` with its update or (`arrives` false) goes offline then, its update
    lost. Both are known at the start, from the plan and the availability."""

    client: int
    start_version: int
    start_s: float
    end_s: float
    arrives: bool


@dataclass(frozen=True)
class Arrival:
    """An update that reached the server: its client's run, its staleness (the current
    version minus `start_version`; the version only changes when a buffer is aggregated, so
    this is also its staleness in that aggregation) and the staleness weight w(staleness)."""

    client: int
    start_version: int
    start_s: float
    arrival_s: float
    staleness: int
    weight: float


@dataclass(frozen=True)
class Aggregation:
    """What the server must do now, at `clock_s`, and what happened since the last one.

    The caller trains `to_train` as one cohort from the current global model (version
    `version`) and keeps their updates, then aggregates the `buffered` updates (every one of
    them has been trained by now: at this or an earlier aggregation) with their weights and
    discards the `dropped_stale` ones; the model becomes version `version + 1`.

    Attributes:
        version: the global model's version before this aggregation.
        clock_s: the simulated time of the aggregation (the buffer's last arrival).
        to_train: sorted clients that started from `version` and arrive (now or later);
            lost clients are never trained.
        buffered: the `buffer_size` updates to aggregate, in arrival order.
        dropped_stale: updates that arrived since the last aggregation with staleness above
            `max_staleness`.
        lost: runs since the last aggregation whose client went offline (`end_s`: when).
        started: clients started since the last aggregation.
    """

    version: int
    clock_s: float
    to_train: list[int]
    buffered: list[Arrival]
    dropped_stale: list[Arrival]
    lost: list[Job]
    started: int
