"""The two fixed ways to fit a table into a budget of rows, against which pruning is judged.

Both return a `RowMap` of the same budget, so a run swaps them for pruning without any other
change, and neither changes during training:

- frequency threshold: the `budget` ids most frequent in the training data get rows, the rest
  share the fallback row. This is a `min_count` vocabulary (datamodules) whose threshold is
  chosen to fit the budget, ties at the threshold settled by the lower id.
- hashing trick: every id is hashed into one of `budget` rows, colliding ids share a row and
  there is no fallback row (so it holds one row fewer than the others at the same budget).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fltoolkit.embeddings.row_map import RowMap

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MASK64 = (1 << 64) - 1


def training_counts(sparse: Tensor, columns: list[int], num_ids: int) -> Tensor:
    """[num_ids] how many times each id occurs in the `columns` of `sparse` that feed one
    table (a ClientTable's sparse ids)."""
    return torch.bincount(sparse[:, columns].flatten().long(), minlength=num_ids)


def frequency_map(counts: Tensor, budget: int) -> RowMap:
    """Rows for the `budget` ids of highest `counts` ([V]) that occur at all, in increasing
    id order; every other id on the fallback."""
    order = torch.argsort(-counts, stable=True)[:budget]
    kept = torch.sort(order[counts[order] > 0]).values
    rows = torch.full((len(counts),), budget, dtype=torch.int64)
    rows[kept] = torch.arange(len(kept))
    return RowMap(rows, budget)


def hashed_map(num_ids: int, budget: int, seed: int) -> RowMap:
    """Id i in row h(i) mod `budget`, h(i) the i-th output of SplitMix64 seeded with `seed`:
    well mixed, so neighbouring ids (a vocabulary sorted by value) do not collide in runs,
    and the same for a seed on every machine."""
    state = np.uint64((seed + _GOLDEN_GAMMA) & _MASK64)
    ids = np.arange(num_ids, dtype=np.uint64)
    hashed = _splitmix64_mix(state + ids * np.uint64(_GOLDEN_GAMMA))
    return RowMap(torch.from_numpy((hashed % np.uint64(budget)).astype(np.int64)), budget,
                  fallback=False)


def _splitmix64_mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 states (arithmetic wraps modulo 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
