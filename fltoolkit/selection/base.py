"""ClientSelector: picks each round's cohort. Subclasses may learn from the round's updates."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from fltoolkit.training.updates import ClientUpdate


class ClientSelector(ABC):
    """Chooses `k` of the `num_clients` training clients for a round."""

    def bind(self, num_clients: int, seed: int) -> None:
        """Called once before the first round with the population size and the run's seed."""
        self.num_clients = num_clients
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7]))

    @abstractmethod
    def select(self, round_index: int, k: int, available: np.ndarray | None = None
               ) -> np.ndarray:
        """Up to k distinct client positions (0..num_clients-1), sorted.

        `available` ([num_clients] bool, simulated devices only) marks the clients online at
        the round's start; only those may be chosen, so fewer than k come back if fewer are
        online.
        """

    def candidates(self, available: np.ndarray | None) -> np.ndarray:
        """The positions a round may choose from."""
        return np.arange(self.num_clients) if available is None else np.flatnonzero(available)

    def feedback(self, round_index: int, updates: list[ClientUpdate],
                 durations: dict[int, float] | None = None) -> None:
        """What the round's aggregated clients reported (loss, samples) and, with simulated
        devices, the simulated seconds of every selected client that stayed online (stragglers
        too); ignored by default."""
        return

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
