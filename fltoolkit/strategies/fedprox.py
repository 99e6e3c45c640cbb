"""FedProx: Li et al., MLSys 2020, "Federated Optimization in Heterogeneous Networks".
Clients minimize loss + mu/2 * ||w - w_global||^2; the server averages as FedAvg does."""

from __future__ import annotations

from typing import Any

from fltoolkit.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg aggregation with a proximal term on the clients.

    Args:
        mu: proximal coefficient (the paper tries 0.001 to 1); 0 is FedAvg.
        server_lr, sparse_weighting, weighted: as in FedAvg.
    """

    name = "FedProx"

    def __init__(self, *, mu: float = 0.01, server_lr: float = 1.0,
                 sparse_weighting: str = "touched", weighted: bool = True) -> None:
        super().__init__(server_lr=server_lr, sparse_weighting=sparse_weighting,
                         weighted=weighted)
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.proximal_mu = mu

    def hyperparameters(self) -> dict[str, Any]:
        return {"mu": self.proximal_mu, **super().hyperparameters()}
