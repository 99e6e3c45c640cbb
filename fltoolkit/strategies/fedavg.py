"""FedAvg: McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data". Sample-weighted averaging of client deltas, row-wise for tables."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from fltoolkit.strategies.base import (
    RowAverage,
    ServerModel,
    Strategy,
    apply_rows,
    check_updates,
    weighted_dense_mean,
    weighted_row_means,
)
from fltoolkit.training.updates import ClientUpdate

SparseWeighting = Literal["touched", "global"]


class FedAvg(Strategy):
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

    def client_weights(self, updates: list[ClientUpdate]) -> Tensor:
        device = updates[0].dense.device
        if self.weighted:
            return torch.tensor([float(u.num_samples) for u in updates], device=device)
        return torch.ones(len(updates), device=device)

    def average(self, updates: list[ClientUpdate], server: ServerModel
                ) -> tuple[Tensor, dict[str, RowAverage]]:
        """The weighted mean delta: dense, and row-wise per table."""
        check_updates(updates, server)
        weights = self.client_weights(updates)
        dense = weighted_dense_mean(updates, weights)
        touched_only = self.sparse_weighting == "touched"
        rows = weighted_row_means(updates, weights, server.tables, touched_only)
        return dense, rows

    def aggregate(self, updates: list[ClientUpdate], server: ServerModel) -> None:
        dense, rows = self.average(updates, server)
        server.dense.add_(dense, alpha=self.server_lr)
        for table, average in rows.items():
            apply_rows(server.tables[table], average, self.server_lr)
