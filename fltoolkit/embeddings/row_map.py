"""Which physical row of a table under a memory budget embeds each logical id.

A table of V logical ids (its vocabulary) is held in `budget` physical rows, plus, for the
pruning policies, one shared fallback row (the last) that every id without a row of its own
uses. Clients train and the server aggregates physical rows; the map is the one place that
says which logical ids they stand for, so pruning, the frequency threshold and the hashing
trick are interchangeable behind it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class RowMap:
    """logical id -> physical row of one table.

    Args:
        logical_to_physical: [V] int64, the physical row of each logical id.
        budget: the rows ids may own: 0 .. budget - 1.
        fallback: whether row `budget` is a shared fallback row (pruning, frequency) or the
            table has no such row (hashing: every row may be shared by several ids).
    """

    def __init__(self, logical_to_physical: Tensor, budget: int, fallback: bool = True) -> None:
        self.budget, self.has_fallback = budget, fallback
        self.logical_to_physical = self._checked(logical_to_physical)

    @classmethod
    def all_fallback(cls, num_ids: int, budget: int) -> RowMap:
        """Every id on the fallback row and every physical row free: a pruning start that
        knows nothing of the ids."""
        return cls(torch.full((num_ids,), budget, dtype=torch.int64), budget)

    @property
    def num_ids(self) -> int:
        return self.logical_to_physical.numel()

    @property
    def physical_rows(self) -> int:
        """Rows of the physical table: the budget, plus the fallback row if there is one."""
        return self.budget + self.has_fallback

    @property
    def fallback(self) -> int | None:
        """The fallback row's index, or None without one."""
        return self.budget if self.has_fallback else None

    def lookup(self, ids: Tensor) -> Tensor:
        """The physical rows of logical `ids` (any shape)."""
        return self.logical_to_physical[ids]

    def admitted(self) -> Tensor:
        """[V] bool: the ids with a physical row of their own (or a hash bucket)."""
        if not self.has_fallback:
            return torch.ones(self.num_ids, dtype=torch.bool)
        return self.logical_to_physical != self.budget

    def owners(self) -> Tensor:
        """[physical rows] the logical id that alone uses each row, for reports; -1 for the
        fallback row, a row used by several ids (colliding hash buckets) or by none (free)."""
        rows = self.logical_to_physical
        users = torch.bincount(rows, minlength=self.physical_rows)
        alone = users[rows] == 1
        owners = torch.full((self.physical_rows,), -1, dtype=torch.int64)
        owners[rows[alone]] = torch.arange(self.num_ids)[alone]
        if self.has_fallback:
            owners[self.budget] = -1
        return owners

    def assign(self, ids: Tensor, rows: Tensor) -> None:
        """Point `ids` at `rows` (the fallback row evicts them), keeping the map valid."""
        updated = self.logical_to_physical.clone()
        updated[ids] = rows
        self.logical_to_physical = self._checked(updated)

    def state_dict(self) -> dict[str, Any]:
        return {"logical_to_physical": self.logical_to_physical.clone(), "budget": self.budget,
                "fallback": self.has_fallback}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (state["logical_to_physical"].numel(), state["budget"], state["fallback"])
        if shape != (self.num_ids, self.budget, self.has_fallback):
            raise ValueError(f"a row map of (ids, budget, fallback) {shape} cannot load into one "
                             f"of {(self.num_ids, self.budget, self.has_fallback)}")
        self.logical_to_physical = self._checked(state["logical_to_physical"].clone())

    def _checked(self, rows: Tensor) -> Tensor:
        """`rows` if every id points at a physical row and, with a fallback, no row below it
        has two ids; a ValueError otherwise."""
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise ValueError(f"logical_to_physical must be a 1-d int64 tensor, got "
                             f"{rows.dtype} of shape {tuple(rows.shape)}")
        if self.budget < 1:
            raise ValueError(f"a row map needs a budget of at least 1 row, got {self.budget}")
        if len(rows) and not bool(((rows >= 0) & (rows < self.physical_rows)).all()):
            raise ValueError(f"logical_to_physical has rows outside 0..{self.physical_rows - 1}")
        if self.has_fallback:
            own = rows[rows != self.budget]
            if bool((torch.bincount(own, minlength=self.budget) > 1).any()):
                raise ValueError("logical_to_physical gives two ids the same row below the "
                                 "fallback")
        return rows
