"""What a client sends back after local training: dense deltas and touched embedding rows
(and, priced before training, what a planned cohort will upload).

An embedding update carries only the rows the client's data touched, `(row_ids, row_deltas)`
per table, never a whole table: that is both what a real client would upload and what keeps
aggregation proportional to the cohort's data instead of to the tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

ID_BYTES = 8  # row ids travel as int64


class SparseRows(NamedTuple):
    """Rows of one table. R: number of rows, E: embedding dim.

    A NamedTuple: a round makes one per client and table (15,000 for 1000 clients), and a
    tuple is the cheapest immutable record to build and read.

    Attributes:
        ids: [R] int64 row indices, unique and sorted.
        values: [R, E] float32 row deltas (in an update) or row values (in a download).
    """

    ids: Tensor
    values: Tensor

    def num_bytes(self) -> int:
        return self.ids.numel() * ID_BYTES + self.values.numel() * self.values.element_size()

    def merged(self, ids: Tensor, values: Tensor) -> SparseRows:
        """These rows with `ids` ([R] sorted unique) set to copies of `values`."""
        keep = ~torch.isin(self.ids, ids)
        ids, order = torch.sort(torch.cat([self.ids[keep], ids]))
        return SparseRows(ids, torch.cat([self.values[keep], values.detach()])[order])

    def copy_into(self, ids: Tensor, target: Tensor) -> None:
        """target[n] = the stored value of row ids[n], where one is stored."""
        position, hit = find_sorted(self.ids, ids)
        target[hit] = self.values[position[hit]]


class RoundRows(NamedTuple):
    """One table's rows of a whole round's clients, client after client (the trainer's
    compact layout): client k's rows are ids[bounds[k]:bounds[k + 1]] with their values.

    Aggregation reduces over these whole-round tensors (segment reductions) instead of over
    one small tensor per client and table."""

    ids: Tensor
    values: Tensor
    bounds: list[int]

    def client(self, slot: int) -> SparseRows:
        return SparseRows(self.ids[self.bounds[slot]:self.bounds[slot + 1]],
                          self.values[self.bounds[slot]:self.bounds[slot + 1]])

    def owners(self) -> Tensor:
        """[U] the slot of each row."""
        return segment_owners(self.bounds, self.ids.device)


def segment_owners(bounds: list[int], device: torch.device) -> Tensor:
    """[bounds[-1]] the segment of each position, for segments k = bounds[k]:bounds[k + 1]."""
    sizes = torch.tensor(bounds, device=device).diff()
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


class ClientRows(Mapping[str, SparseRows]):
    """A client's rows of every table, read from its round's RoundRows: one object per
    client instead of one SparseRows per client and table, which a round of 1000 clients
    and 15 tables built 15,000 of."""

    __slots__ = ("round", "slot")

    def __init__(self, round_rows: dict[str, RoundRows], slot: int) -> None:
        self.round, self.slot = round_rows, slot

    def __getitem__(self, table: str) -> SparseRows:
        return self.round[table].client(self.slot)

    def __contains__(self, table: object) -> bool:
        return table in self.round

    def __iter__(self) -> Iterator[str]:
        return iter(self.round)

    def __len__(self) -> int:
        return len(self.round)

    def num_rows(self) -> int:
        return sum(rows.bounds[self.slot + 1] - rows.bounds[self.slot]
                   for rows in self.round.values())

    def num_bytes(self) -> int:
        """Bytes of every row and its id."""
        total = 0
        for rows in self.round.values():
            count = rows.bounds[self.slot + 1] - rows.bounds[self.slot]
            total += count * (ID_BYTES + rows.values.shape[1] * rows.values.element_size())
        return total


def shared_round(updates: Sequence[ClientUpdate]) -> dict[str, RoundRows] | None:
    """The round layout that every update's tables read from, if they all read one (as the
    trainer made them; faults, sharding or another producer give plain dicts: None)."""
    first = updates[0].tables if updates else None
    if not isinstance(first, ClientRows):
        return None
    shared = first.round
    if all(isinstance(u.tables, ClientRows) and u.tables.round is shared for u in updates):
        return shared
    return None


def table_ids(updates: Sequence[ClientUpdate], table: str) -> Tensor | None:
    """Every update's row ids of `table`, one update after another; None if none has it."""
    shared = shared_round(updates)
    if shared is not None and table in shared:
        rows = shared[table]
        if len(updates) == len(rows.bounds) - 1:  # the whole round: no selection needed
            return rows.ids
        kept = torch.zeros(len(rows.bounds) - 1, dtype=torch.bool, device=rows.ids.device)
        kept[[u.tables.slot for u in updates]] = True
        return rows.ids[kept[rows.owners()]]
    parts = [u.tables[table].ids for u in updates if table in u.tables]
    return torch.cat(parts) if parts else None


def squared_norms(updates: Sequence[ClientUpdate]) -> Tensor:
    """[K] float64 squared L2 norm of each whole update (ClientUpdate.squared_norm), reduced
    over the round layout's whole-round tensors when the updates share one."""
    shared = shared_round(updates)
    if shared is None:
        return torch.tensor([u.squared_norm() for u in updates], dtype=torch.float64)
    squares = torch.stack([u.dense.double().square().sum() for u in updates])
    if shared:
        per_slot = squares.new_zeros(len(next(iter(shared.values())).bounds) - 1)
        for rows in shared.values():
            per_slot.index_add_(0, rows.owners(), rows.values.double().square().sum(1))
        squares += per_slot[[u.tables.slot for u in updates]]
    return squares


def find_sorted(sorted_keys: Tensor, wanted: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of `wanted` in `sorted_keys` and whether each was found."""
    if not sorted_keys.numel():
        return torch.zeros_like(wanted), torch.zeros_like(wanted, dtype=torch.bool)
    position = torch.searchsorted(sorted_keys, wanted).clamp(max=sorted_keys.numel() - 1)
    return position, sorted_keys[position] == wanted


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round.

    Attributes:
        client: position of the client in the training ClientTable.
        num_samples: training rows the client used (its FedAvg weight).
        loss: mean training loss over the client's local steps (q-FedAvg, Oort).
        dense: flat float32 delta of every dense (non-table) parameter, in `named_parameters` order.
        tables: table name -> touched rows and their deltas; local tables never appear here
            (a dict, or the trainer's ClientRows over the round's RoundRows).
        download_bytes: what the client had to receive to train (dense weights and its rows).
        samples_trained: rows trained on, counted once per local step (epochs x rows).
        loss_squared_sum: sum over those samples of their squared loss (Oort's utility).
        finite: whether every delta is finite, when the producer checked a whole round at once
            (None: `is_finite` checks this update's tensors).
        whole: set when this update holds only the part of the tables one rank's shards
            cover (fltoolkit.server.tables): the whole update, whose norm this one reports, so
            norm-based strategies weigh clients the same on every rank.
    """

    client: int
    num_samples: int
    loss: float
    dense: Tensor
    tables: Mapping[str, SparseRows] = field(default_factory=dict)
    download_bytes: int = 0
    samples_trained: int = 0
    loss_squared_sum: float = 0.0
    finite: bool | None = None
    whole: ClientUpdate | None = None

    def upload_bytes(self) -> int:
        dense = self.dense.numel() * self.dense.element_size()
        if isinstance(self.tables, ClientRows):
            return dense + self.tables.num_bytes()
        return dense + sum(rows.num_bytes() for rows in self.tables.values())

    def num_rows(self) -> int:
        """Row deltas sent, over every table."""
        if isinstance(self.tables, ClientRows):
            return self.tables.num_rows()
        return sum(rows.ids.numel() for rows in self.tables.values())

    def squared_norm(self) -> float:
        """Squared L2 norm of the whole update: the dense delta and every row sent, together
        (summed in float64)."""
        if self.whole is not None:
            return self.whole.squared_norm()
        return float(self.dense.double().square().sum()) + sum(
            float(rows.values.double().square().sum()) for rows in self.tables.values())

    def norm(self) -> float:
        return math.sqrt(self.squared_norm())

    def scaled(self, factor: float) -> ClientUpdate:
        """A copy with every delta times `factor` (finiteness is checked again)."""
        tables = {name: SparseRows(rows.ids, rows.values * factor)
                  for name, rows in self.tables.items()}
        whole = None if self.whole is None else self.whole.scaled(factor)
        return replace(self, dense=self.dense * factor, tables=tables, finite=None, whole=whole)

    def is_finite(self) -> bool:
        """No NaN or Inf anywhere (one sum per tensor: NaN and Inf propagate through sums)."""
        if self.finite is not None:
            return self.finite
        sums = [self.dense.sum(), *(rows.values.sum() for rows in self.tables.values())]
        return bool(torch.isfinite(torch.stack(sums)).all())


@dataclass(frozen=True)
class PlannedUploads:
    """A planned cohort's uploads as plain updates, with what a strategy needs to price its
    own protocol's uploads before anyone trains (the simulated clock charges them).

    Attributes:
        own_bytes: [C] per client, its own update: the dense delta and its touched rows of
            every uploaded table, with their ids.
        dense_size: coordinates of the dense delta.
        row_ids: uploaded table -> every client's touched rows, client after client.
        widths: uploaded table -> embedding width.
    """

    own_bytes: np.ndarray
    dense_size: int
    row_ids: dict[str, Tensor]
    widths: dict[str, int]

    @property
    def clients(self) -> int:
        return len(self.own_bytes)

    def union(self) -> dict[str, Tensor]:
        """Uploaded table -> the sorted rows some client of the cohort touched."""
        return {name: torch.unique(ids) for name, ids in self.row_ids.items()}


def plain_upload_bytes(planned: PlannedUploads) -> np.ndarray:
    """Each client of a planned cohort uploads its own update."""
    return planned.own_bytes
