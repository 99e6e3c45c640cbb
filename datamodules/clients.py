"""ClientTable: a split's rows as contiguous tensors, sorted by client, with CSR offsets.

Every user of a click log is a federated client. Keeping all rows in a few contiguous
tensors sorted by client means a client's data is a zero-copy slice (`offsets[c]:offsets[c+1]`)
and a centralized batch is one fancy-index, so no data path iterates over rows in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClientTable:
    """Rows of one split, grouped by client.

    N: number of rows, F: number of sparse features, D: number of dense features,
    C: number of clients.

    Attributes:
        dense: [N, D] float32 dense features.
        sparse: [N, F] int64 vocabulary indices, one column per sparse feature.
        label: [N] float32 click labels (0 or 1).
        offsets: [C + 1] int64; client c owns rows offsets[c]:offsets[c + 1].
        client_ids: [C] int64 raw client keys (the user id for Taobao).
    """

    dense: Tensor
    sparse: Tensor
    label: Tensor
    offsets: Tensor
    client_ids: Tensor

    def __post_init__(self) -> None:
        n = self.label.shape[0]
        if self.dense.shape[0] != n or self.sparse.shape[0] != n:
            raise ValueError(
                f"ClientTable: dense {tuple(self.dense.shape)}, sparse {tuple(self.sparse.shape)} "
                f"and label {tuple(self.label.shape)} disagree on the number of rows"
            )
        if self.offsets.shape[0] != self.client_ids.shape[0] + 1 or int(self.offsets[-1]) != n:
            raise ValueError("ClientTable: offsets must have C + 1 entries ending at the row count")

    @property
    def num_rows(self) -> int:
        return int(self.label.shape[0])

    @property
    def num_clients(self) -> int:
        return int(self.client_ids.shape[0])

    def client_sizes(self) -> Tensor:
        """[C] number of rows of each client."""
        return self.offsets[1:] - self.offsets[:-1]

    def client_rows(self, client: int) -> slice:
        """The row range of one client, for zero-copy slicing."""
        return slice(int(self.offsets[client]), int(self.offsets[client + 1]))

    def row_clients(self) -> Tensor:
        """[N] position of each row's client in this table (0..C-1), e.g. for GAUC groups."""
        return torch.repeat_interleave(torch.arange(self.num_clients), self.client_sizes())

    def rows(self, index: Tensor | slice, groups: Tensor | None = None) -> Batch:
        """The rows at `index` (a slice is a view, a tensor a gather) as a Batch.

        `groups` ([N], e.g. from `row_clients()`) is sliced alongside when given.
        """
        group = None if groups is None else groups[index]
        return Batch(self.dense[index], self.sparse[index], self.label[index], group)

    def drop_small_clients(self, min_rows: int) -> ClientTable:
        """Keep only clients with at least `min_rows` rows (FedScale's `filter_less`)."""
        keep = self.client_sizes() >= min_rows
        if bool(keep.all()):
            return self
        row_keep = torch.repeat_interleave(keep, self.client_sizes())
        sizes = self.client_sizes()[keep]
        offsets = torch.zeros(sizes.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        return ClientTable(
            dense=self.dense[row_keep],
            sparse=self.sparse[row_keep],
            label=self.label[row_keep],
            offsets=offsets,
            client_ids=self.client_ids[keep],
        )

    @staticmethod
    def from_sorted(
        dense: Tensor, sparse: Tensor, label: Tensor, client_key: Tensor
    ) -> ClientTable:
        """Build from rows already sorted by `client_key` ([N] int64, one key per row)."""
        if client_key.numel() and bool((client_key[1:] < client_key[:-1]).any()):
            raise ValueError("ClientTable.from_sorted: rows are not sorted by client")
        client_ids, sizes = torch.unique_consecutive(client_key, return_counts=True)
        offsets = torch.zeros(client_ids.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        return ClientTable(dense, sparse, label, offsets, client_ids)


@dataclass
class Batch:
    """A mini-batch. B: batch size; shapes as in ClientTable."""

    dense: Tensor
    sparse: Tensor
    label: Tensor
    group: Tensor | None = None  # [B] client of each row, for per-user metrics

    def __len__(self) -> int:
        return int(self.label.shape[0])
