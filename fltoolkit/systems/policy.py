"""Which of a round's selected clients get aggregated, and how long the round takes.

Over-commitment selects ceil(k * over_commit) clients and keeps the k that finish first; the
others are stragglers. A deadline drops clients slower than `deadline_s`; a client that goes
offline before it finishes is dropped. With fewer than `min_updates` survivors the round is
skipped. The round lasts as long as its slowest kept client (or, when skipped, until the
deadline if there is one, else until the last selected client gave up or finished).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoundPolicy:
    """What happens to a round's selected clients.

    Args:
        over_commit: select ceil(k * over_commit) clients for k wanted updates (>= 1).
        deadline_s: drop clients whose simulated round time exceeds this; None: no deadline.
        min_updates: skip the round when fewer updates survive (>= 1).
    """

    over_commit: float = 1.0
    deadline_s: float | None = None
    min_updates: int = 1

    def __post_init__(self) -> None:
        if self.over_commit < 1:
            raise ValueError(f"over_commit must be >= 1, got {self.over_commit}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.min_updates < 1:
            raise ValueError(f"min_updates must be >= 1, got {self.min_updates}")

    def num_selected(self, wanted: int) -> int:
        return math.ceil(wanted * self.over_commit)

    def admit(self, seconds: np.ndarray, online: np.ndarray, wanted: int) -> RoundOutcome:
        """Decide from each selected client's simulated time and whether it stays online."""
        seconds = np.asarray(seconds, dtype=np.float64)
        online = np.asarray(online, dtype=bool)
        in_time = np.ones_like(online) if self.deadline_s is None else seconds <= self.deadline_s
        finishing = np.flatnonzero(online & in_time)
        fastest = finishing[np.argsort(seconds[finishing], kind="stable")][:wanted]
        kept = np.sort(fastest)
        stragglers = np.setdiff1d(finishing, kept)
        skipped = kept.size < self.min_updates
        if skipped:
            duration = (self.deadline_s if self.deadline_s is not None
                        else float(seconds.max(initial=0.0)))
            kept = kept[:0]
        else:
            duration = float(seconds[kept].max(initial=0.0))
        return RoundOutcome(kept=kept, stragglers=stragglers,
                            offline=np.flatnonzero(~online),
                            late=np.flatnonzero(online & ~in_time),
                            skipped=bool(skipped), duration_s=duration)


@dataclass(frozen=True)
class RoundOutcome:
    """Positions (into the selected clients) of each fate, and the round's simulated length."""

    kept: np.ndarray
    stragglers: np.ndarray
    offline: np.ndarray
    late: np.ndarray
    skipped: bool
    duration_s: float
