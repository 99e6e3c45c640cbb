"""What a client sends back after local training: dense deltas and touched embedding rows.

An embedding update carries only the rows the client's data touched, `(row_ids, row_deltas)`
per table, never a whole table: that is both what a real client would upload and what keeps
aggregation proportional to the cohort's data instead of to the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

ID_BYTES = 8  # row ids travel as int64


@dataclass(frozen=True)
class SparseRows:
    """Rows of one table. R: number of rows, E: embedding dim.

    Attributes:
        ids: [R] int64 row indices, unique and sorted.
        values: [R, E] float32 row deltas (in an update) or row values (in a download).
    """

    ids: Tensor
    values: Tensor

    def num_bytes(self) -> int:
        return self.ids.numel() * ID_BYTES + self.values.numel() * self.values.element_size()


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round.

    Attributes:
        client: position of the client in the training ClientTable.
        num_samples: training rows the client used (its FedAvg weight).
        loss: mean training loss over the client's local steps (q-FedAvg, Oort).
        dense: flat float32 delta of every dense (non-table) parameter, in `named_parameters` order.
        tables: table name -> touched rows and their deltas; local tables never appear here.
        download_bytes: what the client had to receive to train (dense weights and its rows).
    """

    client: int
    num_samples: int
    loss: float
    dense: Tensor
    tables: dict[str, SparseRows] = field(default_factory=dict)
    download_bytes: int = 0

    def upload_bytes(self) -> int:
        dense = self.dense.numel() * self.dense.element_size()
        return dense + sum(rows.num_bytes() for rows in self.tables.values())

    def is_finite(self) -> bool:
        """No NaN or Inf anywhere (one sum per tensor: NaN and Inf propagate through sums)."""
        sums = [self.dense.sum(), *(rows.values.sum() for rows in self.tables.values())]
        return bool(torch.isfinite(torch.stack(sums)).all())
