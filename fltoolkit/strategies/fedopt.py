"""Adaptive server optimizers on the pseudo-gradient -(mean delta): Reddi et al., ICLR 2021,
"Adaptive Federated Optimization" (FedAdagrad, FedAdam, FedYogi).

`ServerOptimizer` is the shared frame (also of FedAvgM): embedding tables are updated lazily,
only the rows some client touched this round get their moments updated and move, as
SparseAdam does for sparse gradients. Dense moments are vectors.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from fltoolkit.strategies.base import ServerModel
from fltoolkit.strategies.fedavg import FedAvg, SparseWeighting
from fltoolkit.strategies.sums import UpdateSum


class ServerOptimizer(FedAvg):
    """Averages like FedAvg, then takes a stateful server step with the mean delta.

    Subclasses say what state a step keeps (`initial_moments`) and how it moves the weights
    (`step`); this class keeps that state per dense vector and per touched table row.

    Args:
        server_lr: the server learning rate (the step's scale).
        sparse_weighting, weighted: as in FedAvg.
    """

    def __init__(self, *, server_lr: float, sparse_weighting: SparseWeighting = "touched",
                 weighted: bool = True) -> None:
        super().__init__(server_lr=server_lr, sparse_weighting=sparse_weighting,
                         weighted=weighted)
        self.moments: dict[str, dict[str, Tensor]] = {}

    @abstractmethod
    def initial_moments(self, like: Tensor) -> dict[str, Tensor]:
        """The state before the first round, shaped like `like`."""

    @abstractmethod
    def step(self, delta: Tensor, moments: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """(update to add to the weights, new moments) for a mean delta."""

    def _moments(self, name: str, like: Tensor) -> dict[str, Tensor]:
        if name not in self.moments:
            self.moments[name] = self.initial_moments(like)
        return self.moments[name]

    def apply_sum(self, total: UpdateSum, server: ServerModel) -> None:
        dense, rows = self.mean(total)
        state = self._moments("dense", server.dense)
        update, new = self.step(dense, state)
        state.update(new)
        server.dense.add_(update)
        for table, average in rows.items():
            state = self._moments(table, server.tables[table])
            ids = average.ids
            update, new = self.step(average.values, {k: v[ids] for k, v in state.items()})
            for key, value in new.items():
                state[key][ids] = value
            server.tables[table].index_add_(0, ids, update)

    def reset_rows(self, table: str, rows: Tensor) -> None:
        """The rows' moments back to their state before the first round."""
        state = self.moments.get(table)
        if state is None or not len(rows):
            return
        initial = self.initial_moments(state[next(iter(state))][rows])
        for key, value in initial.items():
            state[key][rows] = value

    def state_dict(self) -> dict[str, Any]:
        return {"moments": self.moments}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments = state["moments"]


class FedOpt(ServerOptimizer):
    """Base of the adaptive server optimizers (Reddi et al.'s Algorithm 2).

    Args:
        server_lr: the server learning rate (the paper's eta).
        beta_1: first-moment decay.
        beta_2: second-moment decay (unused by FedAdagrad).
        tau: adaptivity; also the initial second moment is tau**2 (v_{-1} >= tau^2 in the paper).
        sparse_weighting, weighted: as in FedAvg.
    """

    def __init__(self, *, server_lr: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3, sparse_weighting: SparseWeighting = "touched",
                 weighted: bool = True) -> None:
        super().__init__(server_lr=server_lr, sparse_weighting=sparse_weighting,
                         weighted=weighted)
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau

    def hyperparameters(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "beta_1": self.beta_1, "beta_2": self.beta_2,
                "tau": self.tau, "sparse_weighting": self.sparse_weighting,
                "weighted": self.weighted}

    @abstractmethod
    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        """The new v from the old v and the mean delta (the part that differs per method)."""

    def initial_moments(self, like: Tensor) -> dict[str, Tensor]:
        """Moments before the first round: m = 0, v = tau^2."""
        return {"m": torch.zeros_like(like), "v": torch.full_like(like, self.tau ** 2)}

    def step(self, delta: Tensor, moments: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        m = self.beta_1 * moments["m"] + (1 - self.beta_1) * delta
        v = self.second_moment(moments["v"], delta)
        return self.server_lr * m / (v.sqrt() + self.tau), {"m": m, "v": v}


class FedAdagrad(FedOpt):
    """v <- v + delta^2."""

    name = "FedAdagrad"

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return v + delta * delta

    def hyperparameters(self) -> dict[str, Any]:
        params = super().hyperparameters()
        params.pop("beta_2")
        return params


class FedAdam(FedOpt):
    """v <- beta_2 v + (1 - beta_2) delta^2."""

    name = "FedAdam"

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * delta * delta


class FedYogi(FedOpt):
    """v <- v - (1 - beta_2) delta^2 sign(v - delta^2)."""

    name = "FedYogi"

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        squared = delta * delta
        return v - (1 - self.beta_2) * squared * torch.sign(v - squared)
