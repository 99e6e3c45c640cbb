"""UpdateGate: what the server accepts of a round's updates.

Between training and aggregation every update passes the gate: injected faults first (a
simulation of misbehaving clients, when configured), then the checks: non-finite updates are
always refused, norm outliers when `reject_norm_ratio` is set. Refused updates are counted,
never aggregated, and their clients keep nothing of the round (see CohortTrainer.keep).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fltoolkit.gate.faults import Faults, norm_outliers
from fltoolkit.strategies.base import Uploads, plain_uploads
from fltoolkit.training.updates import ClientUpdate


@dataclass(frozen=True)
class Screened:
    """One round through the gate.

    Attributes:
        accepted: the updates to aggregate, in cohort order.
        rejected: updates refused (non-finite, norm outliers).
        crashed: clients that trained but never reported (injected faults).
        bytes_down: what the cohort downloaded to train.
        bytes_up: what reached the server (crashed clients upload nothing).
        rows_up: the row deltas among those bytes.
    """

    accepted: list[ClientUpdate]
    rejected: int
    crashed: int
    bytes_down: int
    bytes_up: int
    rows_up: int


class UpdateGate:
    """Screens a round's updates.

    Args:
        seed: the run's seed (fault draws derive from it).
        faults: injected client faults (none by default).
        reject_norm_ratio: refuse updates whose norm exceeds this multiple of the round's
            median norm (with more than two updates); None: no norm check.
        uploads: what the updates that reach the server cost to send (the strategy's
            `uploads`: secure aggregation sends masked vectors, not the updates).
    """

    def __init__(self, seed: int, faults: Faults | None = None,
                 reject_norm_ratio: float | None = None,
                 uploads: Callable[[list[ClientUpdate]], Uploads] = plain_uploads) -> None:
        self.seed = seed
        self.faults = faults or Faults()
        self.reject_norm_ratio = reject_norm_ratio
        self.uploads = uploads

    def screen(self, updates: list[ClientUpdate], round_index: int) -> Screened:
        bytes_down = sum(update.download_bytes for update in updates)
        crashed = 0
        if self.faults.active:
            reported = [self.faults.inject(update, self.seed, round_index) for update in updates]
            updates = [update for update in reported if update is not None]
            crashed = len(reported) - len(updates)
        sent = self.uploads(updates)
        accepted = [u for u in updates if u.is_finite() and np.isfinite(u.loss)]
        ratio = self.reject_norm_ratio
        if ratio is not None and len(accepted) > 2:
            outlier = norm_outliers(accepted, ratio).tolist()
            accepted = [u for u, bad in zip(accepted, outlier, strict=True) if not bad]
        return Screened(accepted, len(updates) - len(accepted), crashed, bytes_down, sent.bytes,
                        sent.rows)
