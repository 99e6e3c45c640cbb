"""The asynchronous server's settings (FedBuff): how many clients train at once, how many
updates make an aggregation, and how stale an update may be."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fltoolkit.asynchronous.staleness import StalenessWeight
from fltoolkit.systems.clock import IDLE_WAIT_S


@dataclass(frozen=True)
class AsyncPolicy:
    """What the asynchronous server does.

    Attributes:
        concurrency: clients training at every moment (>= 1); one that arrives or is lost is
            replaced at that instant.
        buffer_size: arrived updates per aggregation (>= 1). It may exceed `concurrency`:
            the buffer then fills over more than one client's run, as replacements arrive.
            With buffer_size == concurrency and every client taking the same time, each
            aggregation is a synchronous round (all updates fresh, all clients restarted).
        staleness: the weight of an update of staleness s (see staleness.py).
        max_staleness: updates staler than this are dropped (counted, never aggregated);
            None: no limit.
        idle_wait_s: when the selection finds fewer clients than free slots, the server
            tries again this many simulated seconds later (and at every arrival or loss).
    """

    concurrency: int
    buffer_size: int
    staleness: StalenessWeight = field(default_factory=StalenessWeight)
    max_staleness: int | None = None
    idle_wait_s: float = IDLE_WAIT_S

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {self.max_staleness}")
        if not (math.isfinite(self.idle_wait_s) and self.idle_wait_s > 0):
            raise ValueError(f"idle_wait_s must be finite and > 0, got {self.idle_wait_s}")

    def too_stale(self, staleness: int) -> bool:
        return self.max_staleness is not None and staleness > self.max_staleness
