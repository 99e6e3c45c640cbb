"""Strategies that need only the sum of a round's updates, and that sum as a type.

FedAvg and the server optimizers step with a weighted mean delta, which is a weighted sum
divided by a sum of weights. Splitting such a strategy into what each client contributes to
the sum (`contributions`, client side) and what the server does with the sum (`apply_sum`)
lets a wrapper change how the sum is formed without the inner strategy ever seeing one
client's update: secure aggregation forms it from masked vectors, differential privacy adds
noise to it. `UpdateSum` holds nothing about any single client.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from fltoolkit.strategies.base import (
    RowSum,
    ServerModel,
    Strategy,
    check_updates,
    weighted_dense_sum,
    weighted_row_sums,
)
from fltoolkit.training.updates import ClientUpdate


class Contribution(NamedTuple):
    """What one client puts into the round's sum: its deltas times weight * scale, its
    weight (the mean's denominator), and further scalars summed over the cohort (e.g. DP's
    unclipped indicator). `scale` is clipping: it shrinks the deltas, not the weight."""

    update: ClientUpdate
    weight: float
    scale: float = 1.0
    extras: dict[str, float] = {}


@dataclass(frozen=True)
class UpdateSum:
    """The sum of a round's contributions: all an averaging strategy learns of the round.
    A step consumes it: its tensors may be divided in place.

    Attributes:
        dense: sum_k w_k * dense delta_k.
        weight: sum_k w_k (the mean's denominator).
        rows: table -> the weighted sum of row deltas over the clients that touched each row.
        clients: how many contributions were summed.
        extras: each extra scalar summed over the contributions.
    """

    dense: Tensor
    weight: float
    rows: dict[str, RowSum]
    clients: int
    extras: dict[str, float] = field(default_factory=dict)


def sum_contributions(contributions: list[Contribution], tables: dict[str, Tensor]
                      ) -> UpdateSum:
    """The plain (unprotected) sum of `contributions`; `tables` gives the tables' shapes."""
    updates = [c.update for c in contributions]
    device = updates[0].dense.device
    weights = torch.tensor([c.weight for c in contributions], device=device)
    scales = torch.tensor([c.scale for c in contributions], device=device)
    extras: dict[str, float] = {}
    for contribution in contributions:
        for key, value in contribution.extras.items():
            extras[key] = extras.get(key, 0.0) + value
    return UpdateSum(dense=weighted_dense_sum(updates, weights * scales),
                     weight=float(weights.double().sum()),
                     rows=weighted_row_sums(updates, weights, tables, scales),
                     clients=len(contributions), extras=extras)


def require_sums(strategy: Strategy, wrapper: str, why: str) -> None:
    """Refuse, in one line, a strategy that needs individual updates under `wrapper`."""
    if not isinstance(strategy, SumStrategy):
        raise ValueError(f"{wrapper} needs an averaging strategy (FedAvg, FedAvgM, FedAdam, "
                         f"FedYogi, FedAdagrad), not {strategy.name}: {why}")


class SumStrategy(Strategy):
    """A strategy whose server step depends on the round only through the sum of what its
    clients contribute."""

    @abstractmethod
    def contributions(self, updates: list[ClientUpdate]) -> list[Contribution]:
        """What each client adds to the sum, computed client side: each from its own update
        alone (a round's are computed together only for speed)."""

    @abstractmethod
    def apply_sum(self, total: UpdateSum, server: ServerModel) -> None:
        """The server step from the round's sum, in place on `server`."""

    def norm_bound(self) -> float | None:
        """A bound this strategy puts on every contribution's scale * ||delta|| (DP's clip
        norm), or None."""
        return None

    def extra_names(self) -> list[str]:
        """The extra scalars every contribution carries (`Contribution.extras`), by name: a
        protocol that lays contributions out on a vector needs them before any exists."""
        return []

    def aggregate(self, updates: list[ClientUpdate], server: ServerModel) -> None:
        check_updates(updates, server)
        total = sum_contributions(self.contributions(updates), server.tables)
        self.apply_sum(total, server)
