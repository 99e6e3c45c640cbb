"""q-FedAvg: Li et al., ICLR 2020, "Fair Resource Allocation in Federated Learning".
Clients with a higher loss F_k get more weight, by a power q, for a fairer accuracy spread."""

from __future__ import annotations

from typing import Any

import torch

from fltoolkit.strategies.base import ServerModel, Strategy, check_updates
from fltoolkit.training.updates import ClientUpdate, squared_norms


class QFedAvg(Strategy):
    """With L = 1 / client_lr and delta_k = w_k - w (the client's change):

        Delta_k = F_k^q * L * (-delta_k)
        h_k     = q * F_k^(q-1) * ||L * delta_k||^2 + L * F_k^q
        w      <- w - sum_k Delta_k / sum_k h_k

    ||.|| spans the dense delta and every table row the client sent; rows a client did not
    touch contribute zero to its Delta_k. F_k is the client's mean training loss.

    Args:
        q: fairness power; q = 0 gives the plain (unweighted) mean of the client deltas.
        client_lr: the clients' learning rate, the inverse of the Lipschitz constant L.
    """

    name = "QFedAvg"

    def __init__(self, *, q: float = 0.2, client_lr: float = 0.05) -> None:
        if q < 0 or client_lr <= 0:
            raise ValueError("QFedAvg needs q >= 0 and client_lr > 0")
        self.q, self.client_lr = q, client_lr

    def hyperparameters(self) -> dict[str, Any]:
        return {"q": self.q, "client_lr": self.client_lr}

    def aggregate(self, updates: list[ClientUpdate], server: ServerModel) -> None:
        check_updates(updates, server)
        lipschitz = 1.0 / self.client_lr
        loss = torch.tensor([max(u.loss, 1e-10) for u in updates], dtype=torch.float64)
        squared_norm = squared_norms(updates).cpu()
        loss_q = loss.pow(self.q)
        h = self.q * loss.pow(self.q - 1) * lipschitz ** 2 * squared_norm + lipschitz * loss_q
        # w - sum(Delta_k)/sum(h_k) = w + sum(F_k^q L delta_k) / sum(h_k)
        scale = (loss_q * lipschitz / h.sum()).float()
        for update, weight in zip(updates, scale, strict=True):
            server.dense.add_(update.dense, alpha=float(weight))
            for table, rows in update.tables.items():
                server.tables[table].index_add_(0, rows.ids, rows.values, alpha=float(weight))
