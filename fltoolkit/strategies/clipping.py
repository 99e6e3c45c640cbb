"""Norm clipping around any strategy: the clipping of Sun et al. 2019, "Can You Really Backdoor
Federated Learning?", and the first half of client-level differential privacy."""

from __future__ import annotations

from typing import Any

from fltoolkit.strategies.base import ServerModel, Strategy, StrategyWrapper
from fltoolkit.training.updates import ClientUpdate


def clipped(update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """The update scaled by min(1, max_norm / ||update||), the norm spanning the dense delta
    and every row it sent; the input is left as it is."""
    norm = update.norm()
    return update if norm <= max_norm else update.scaled(max_norm / norm)


class NormClipping(StrategyWrapper):
    """Clips every update's L2 norm to `max_norm`, then aggregates with the wrapped strategy.

    With FedAvg one client can then move the global model by at most its weight share times
    max_norm, however large the update it sends; honest updates under the bound pass
    unchanged.

    Args:
        strategy: the strategy that aggregates the clipped updates (FedAvg, FedAdam, ...).
        max_norm: bound on each client's whole update (dense delta and table rows together).
            No default: it depends on the model and the local training, e.g. a little above
            the median update norm of a clean run.
    """

    def __init__(self, strategy: Strategy, *, max_norm: float) -> None:
        super().__init__(strategy)
        if max_norm <= 0:
            raise ValueError(f"NormClipping max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def own_hyperparameters(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def aggregate(self, updates: list[ClientUpdate], server: ServerModel) -> None:
        self.strategy.aggregate([clipped(u, self.max_norm) for u in updates], server)
