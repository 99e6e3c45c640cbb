"""Injected client faults (`federated.faults`), to test that bad clients cannot hurt a run.

Each selected client draws once per round, from a generator seeded by (run seed, round,
client), so the same config injects the same faults and a resumed run injects them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fltoolkit.training.updates import ClientUpdate, squared_norms

FAULT_STREAM = 0xFA017  # keeps the fault draws independent of every other seeded stream


@dataclass(frozen=True)
class Faults:
    """Fractions of clients that misbehave each round (all 0: no faults).

    Args:
        crash: train but never report (the update is lost; counted as `crashed`).
        nan: report an update full of NaN (rejected by the finiteness check).
        scale: report their update times `scale_factor` (a crude model-poisoning attack).
        scale_factor: the malicious clients' multiplier (-10.0).
    """

    crash: float = 0.0
    nan: float = 0.0
    scale: float = 0.0
    scale_factor: float = -10.0

    def __post_init__(self) -> None:
        for name in ("crash", "nan", "scale"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"federated.faults.{name} must be in [0, 1], got {value}")
        if self.crash + self.nan + self.scale > 1.0:
            raise ValueError("federated.faults: crash + nan + scale must be <= 1")

    @property
    def active(self) -> bool:
        return self.crash + self.nan + self.scale > 0

    def inject(self, update: ClientUpdate, seed: int, round_index: int) -> ClientUpdate | None:
        """The update as the faulty client would report it; None if it crashed."""
        draw = np.random.default_rng([seed, round_index, update.client, FAULT_STREAM]).random()
        if draw < self.crash:
            return None
        if draw < self.crash + self.nan:
            return update.scaled(float("nan"))
        if draw < self.crash + self.nan + self.scale:
            return update.scaled(self.scale_factor)
        return update


def norm_outliers(updates: list[ClientUpdate], ratio: float) -> torch.Tensor:
    """[K] bool: updates whose L2 norm exceeds `ratio` times the round's median norm."""
    norms = squared_norms(updates).cpu().sqrt()
    return norms > ratio * norms.median()
