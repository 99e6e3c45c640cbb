"""Uniform random selection without replacement, seeded (FedAvg's default participation)."""

from __future__ import annotations

import numpy as np

from fltoolkit.selection.base import ClientSelector


class UniformSelector(ClientSelector):
    """Every round, `k` clients drawn uniformly without replacement (from those online, with
    simulated devices)."""

    def select(self, round_index: int, k: int, available: np.ndarray | None = None
               ) -> np.ndarray:
        pool = self.candidates(available)
        return np.sort(self.rng.choice(pool, size=min(k, pool.size), replace=False))
