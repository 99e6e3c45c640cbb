"""Poisson client sampling: every client joins a round independently with probability q.

The sampling that client-level DP accountants analyse most tightly (the PLD accountant of
`dp-accounting` accounts for it exactly): the cohort's size varies round to round around
q * num_clients, and DP-FedAvg divides by that expectation, not by the size drawn.
"""

from __future__ import annotations

import numpy as np

from fltoolkit.selection.base import ClientSelector


class PoissonSelector(ClientSelector):
    """Each round, each client independently with probability q = k / num_clients, k being
    `clients_per_round` (the expected cohort size). With simulated devices only online
    clients can join, which changes the sampling (the accountant's assumption then fails)."""

    def select(self, round_index: int, k: int, available: np.ndarray | None = None
               ) -> np.ndarray:
        joined = self.rng.random(self.num_clients) < k / self.num_clients
        if available is not None:
            joined &= available
        return np.flatnonzero(joined)
