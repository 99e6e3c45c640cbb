"""The memory budget of a table and AdaEmbed-style pruning within it.

Every `prune_interval` rounds the ids ranked highest by importance keep (or get) the table's
physical rows and the rest are evicted to the shared fallback row. Evicted ids keep being
scored (fltoolkit.embeddings.importance), so one that becomes important is re-admitted into
a row an eviction freed: the table never holds more than its budget of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fltoolkit.embeddings.row_map import RowMap


class Rebalance(NamedTuple):
    """What one rebalance changed in a row map.

    Attributes:
        evicted: logical ids moved from a row of their own to the fallback.
        admitted: logical ids given a row of their own.
        changed_rows: the physical row each admitted id got (aligned with `admitted`): rows
            with a new owner, whose values and optimizer state belonged to another id.
        size: the ids holding a row of their own afterwards (at most the budget).
    """

    evicted: Tensor
    admitted: Tensor
    changed_rows: Tensor
    size: int


@dataclass(frozen=True)
class BudgetPolicy:
    """When and how a table's rows are re-balanced (its rows: fltoolkit.embeddings.allocation).

    Attributes:
        prune_interval: rounds between rebalances.
        hysteresis: an id holding a row ranks with its score times (1 + hysteresis), so an
            evicted id must beat it by that margin to take its place (fewer swaps of ids whose
            scores are close, each of which resets a row).
    """

    prune_interval: int = 1
    hysteresis: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.prune_interval, bool) or not isinstance(self.prune_interval, int) \
                or self.prune_interval < 1:
            raise ValueError(f"embeddings.prune_interval must be a whole number of rounds >= 1, "
                             f"got {self.prune_interval!r}")
        if not self.hysteresis >= 0.0:
            raise ValueError(f"embeddings.hysteresis must be >= 0, got {self.hysteresis}")

    def due(self, round_index: int) -> bool:
        """Whether to rebalance after round `round_index` (0-based): after every
        `prune_interval` rounds."""
        return (round_index + 1) % self.prune_interval == 0

    def rebalance(self, row_map: RowMap, scores: Tensor) -> Rebalance:
        """Give the top `row_map.budget` ids by `scores` ([V], one per logical id) rows of
        their own, in place on `row_map`.

        An id that holds no row is a candidate only with a score above 0 (an id nobody
        touched gains nothing from a row), so rows may stay free. Ties rank ids holding a row
        first, then lower ids. Ids that stay keep their rows; the admitted take the freed or
        free rows in increasing order, the ids in increasing order.
        """
        if row_map.fallback is None:
            raise ValueError("a row map without a fallback row (hashing) cannot be pruned")
        held = row_map.admitted()
        ranked = scores.double() * torch.where(held, 1.0 + self.hysteresis, 1.0)
        order = torch.arange(row_map.num_ids)
        order = order[torch.argsort((~held).to(torch.int8), stable=True)]
        order = order[torch.argsort(-ranked[order], stable=True)]
        order = order[(held | (scores > 0))[order]][:row_map.budget]
        keep = torch.zeros(row_map.num_ids, dtype=torch.bool)
        keep[order] = True
        evicted = torch.nonzero(held & ~keep).flatten()
        admitted = torch.nonzero(keep & ~held).flatten()
        taken = torch.zeros(row_map.budget, dtype=torch.bool)
        taken[row_map.lookup(torch.nonzero(keep & held).flatten())] = True
        rows = torch.nonzero(~taken).flatten()[:len(admitted)]
        row_map.assign(torch.cat([evicted, admitted]),
                       torch.cat([torch.full_like(evicted, row_map.fallback), rows]))
        return Rebalance(evicted, admitted, rows, int(keep.sum()))


def initialize_admitted(weight: Tensor, change: Rebalance, row_map: RowMap) -> None:
    """Start each admitted id's row at the fallback row's current value, in place on `weight`
    ([physical rows, E], the server's table).

    The fallback is what the id was embedded with while evicted, so admission does not
    change the model's output on it; a fresh draw from the table's initial distribution
    would throw away what the fallback learnt and perturb predictions for exactly the ids
    that have just proven important. (The caller also drops the rows' optimizer state.)
    """
    if row_map.fallback is None:
        raise ValueError("a row map without a fallback row (hashing) admits no ids")
    with torch.no_grad():
        weight[change.changed_rows] = weight[row_map.fallback].clone()
