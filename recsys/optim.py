"""One optimizer object over two: Adam-like for the MLPs, a sparse-capable one for the tables.

Lightning's automatic optimization steps one optimizer with one closure (forward + backward).
torchrec's CombinedOptimizer passes the closure to each inner optimizer, which would run the
forward and backward twice; this wrapper runs it once and then steps both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer


class DenseSparseOptimizer(Optimizer):
    """Steps `dense` (MLP parameters) and `sparse` (embedding tables) after one closure call."""

    def __init__(self, dense: Optimizer, sparse: Optimizer) -> None:
        self.dense, self.sparse = dense, sparse
        self.optimizers = (dense, sparse)
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.dense.param_groups + self.sparse.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {**self.dense.state, **self.sparse.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none)
        self.sparse.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.dense.step()
        self.sparse.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])

    def __repr__(self) -> str:
        return f"DenseSparseOptimizer(dense={self.dense!r}, sparse={self.sparse!r})"
