"""FedAvgM: server momentum, Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification"."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fltoolkit.strategies.fedavg import SparseWeighting
from fltoolkit.strategies.fedopt import ServerOptimizer


class FedAvgM(ServerOptimizer):
    """m <- momentum * m + delta; w <- w + server_lr * m (momentum 0 and server_lr 1: FedAvg).

    Args:
        server_lr: the server learning rate.
        momentum: server momentum.
        sparse_weighting, weighted: as in FedAvg.
    """

    name = "FedAvgM"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9,
                 sparse_weighting: SparseWeighting = "touched", weighted: bool = True) -> None:
        super().__init__(server_lr=server_lr, sparse_weighting=sparse_weighting,
                         weighted=weighted)
        self.momentum = momentum

    def hyperparameters(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "momentum": self.momentum,
                "sparse_weighting": self.sparse_weighting, "weighted": self.weighted}

    def initial_moments(self, like: Tensor) -> dict[str, Tensor]:
        return {"m": torch.zeros_like(like)}

    def step(self, delta: Tensor, moments: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        m = self.momentum * moments["m"] + delta
        return self.server_lr * m, {"m": m}
