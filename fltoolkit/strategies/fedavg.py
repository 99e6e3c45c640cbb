"""FedAvg: McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data". Sample-weighted averaging of client deltas, row-wise for tables."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from fltoolkit.strategies.base import ServerModel, apply_rows
from fltoolkit.strategies.sums import Contribution, SumStrategy, UpdateSum
from fltoolkit.training.updates import ClientUpdate, SparseRows

SparseWeighting = Literal["touched", "global"]


class FedAvg(SumStrategy):
    """w <- w + server_lr * (sum_k n_k delta_k / sum_k n_k).

    Args:
        server_lr: scale of the averaged delta (1.0 is plain FedAvg).
        sparse_weighting: `touched` averages an embedding row over the clients that touched it
            (untouched rows unchanged); `global` divides by every client's weight, as if the
            others had sent a zero delta for the row (the dense-model convention, to compare).
        weighted: weight clients by their number of samples (True) or equally (False).
    """

    name = "FedAvg"

    def __init__(self, *, server_lr: float = 1.0,
                 sparse_weighting: SparseWeighting = "touched",
                 weighted: bool = True) -> None:
        if server_lr <= 0:
            raise ValueError(f"strategy server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.sparse_weighting = sparse_weighting
        self.weighted = weighted

    def hyperparameters(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "sparse_weighting": self.sparse_weighting,
                "weighted": self.weighted}

    def contributions(self, updates: list[ClientUpdate]) -> list[Contribution]:
        return [Contribution(u, float(u.num_samples) if self.weighted else 1.0)
                for u in updates]

    def mean(self, total: UpdateSum) -> tuple[Tensor, dict[str, SparseRows]]:
        """The weighted mean delta: dense, and row-wise per table. Divides the sum's tensors
        in place (a sum is consumed by its step): under DP they span whole tables, where a
        new tensor per table cost more than drawing the noise."""
        dense = total.dense.div_(total.weight)
        rows = {}
        for table, summed in total.rows.items():
            denominator = (summed.weights[:, None] if self.sparse_weighting == "touched"
                           else total.weight)
            rows[table] = SparseRows(summed.ids, summed.values.div_(denominator))
        return dense, rows

    def apply_sum(self, total: UpdateSum, server: ServerModel) -> None:
        dense, rows = self.mean(total)
        server.dense.add_(dense, alpha=self.server_lr)
        for table, mean in rows.items():
            apply_rows(server.tables[table], mean, self.server_lr)
