"""Uniform random selection without replacement, seeded (FedAvg's default participation)."""

from __future__ import annotations

import numpy as np

from fltoolkit.selection.base import ClientSelector


class UniformSelector(ClientSelector):
    """Every round, `k` clients drawn uniformly without replacement from the whole population."""

    def select(self, round_index: int, k: int) -> np.ndarray:
        return np.sort(self.rng.choice(self.num_clients, size=k, replace=False))
