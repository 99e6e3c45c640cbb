"""Passes over the population: every client exactly once per pass, in a seeded random order.

Uniform selection revisits some clients before others are seen once; a pass ("an epoch of
federated training") trains every client once, which is what comparing with one
centralized epoch, or covering a whole log in one pass, needs.
"""

from __future__ import annotations

import numpy as np
import torch

from fltoolkit.selection.base import ClientSelector


class EpochSelector(ClientSelector):
    """`k` clients a round, in the order of a seeded permutation of all clients, a new
    permutation once every client has been chosen. The last round of a pass takes the clients
    it has left, so it may have fewer than `k`. With simulated devices, clients offline at the
    round's start keep their turn and are chosen once online, still within their pass."""

    def bind(self, num_clients: int, seed: int) -> None:
        super().bind(num_clients, seed)
        self.passes = 0
        self.remaining = self.rng.permutation(num_clients)

    def select(self, round_index: int, k: int, available: np.ndarray | None = None
               ) -> np.ndarray:
        if not self.remaining.size:
            self.passes += 1
            self.remaining = self.rng.permutation(self.num_clients)
        if available is None:
            chosen, self.remaining = self.remaining[:k], self.remaining[k:]
        else:
            chosen = self.remaining[available[self.remaining]][:k]
            self.remaining = self.remaining[~np.isin(self.remaining, chosen)]
        return np.sort(chosen)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "passes": self.passes,
                "remaining": torch.from_numpy(self.remaining.copy())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.passes = state["passes"]
        self.remaining = state["remaining"].numpy().copy()
