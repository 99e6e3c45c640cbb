"""ClientOptimizerStates: each client's local optimizer state, kept between its rounds.

Used with `federated.keep_optimizer_state: true` (by default local state starts fresh every
round). State of dense parameters is kept whole. State shaped like a table (Adagrad's sums,
Adam's moments) is kept only for the rows the client touched, keyed by global row id, because
a round's compact layout of the tables differs from the last one. Memory grows with the
clients seen: a client costs its dense state plus its rows' state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fltoolkit.updates import SparseRows


class ClientOptimizerStates:
    """Saved optimizer states by client; tables are mapped by `segments` on save and load.

    `segments` maps each table parameter (currently a compact buffer) to the global row ids
    of the client's segment and the slice of the buffer that holds them.
    """

    def __init__(self) -> None:
        self.states: dict[int, list[dict[nn.Parameter, dict[str, Any]]]] = {}

    def save(self, client: int, optimizers: list[torch.optim.Optimizer],
             segments: dict[nn.Parameter, tuple[Tensor, slice]]) -> None:
        previous = self.states.get(client)
        saved = []
        for index, optimizer in enumerate(optimizers):
            kept = previous[index] if previous else {}
            params = {}
            for param, state in optimizer.state.items():
                segment = segments.get(param)
                params[param] = {key: _save(value, param, segment, kept.get(param, {}).get(key))
                                 for key, value in state.items()}
            saved.append(params)
        self.states[client] = saved

    def load(self, client: int, optimizers: list[torch.optim.Optimizer],
             segments: dict[nn.Parameter, tuple[Tensor, slice]]) -> None:
        """Put the client's saved state into freshly built optimizers (no-op the first time)."""
        for optimizer, params in zip(optimizers, self.states.get(client, []), strict=False):
            for param, state in params.items():
                fresh = optimizer.state.get(param, {})
                optimizer.state[param] = {
                    key: _load(value, param, segments.get(param), fresh.get(key))
                    for key, value in state.items()}


def _save(value: Any, param: nn.Parameter, segment: tuple[Tensor, slice] | None,
          kept: Any) -> Any:
    if not torch.is_tensor(value):
        return value
    if segment is None or value.shape != param.shape:
        return value.clone()
    ids, rows = segment
    if isinstance(kept, SparseRows):
        return kept.merged(ids, value[rows])
    return SparseRows(ids.clone(), value[rows].clone())


def _load(value: Any, param: nn.Parameter, segment: tuple[Tensor, slice] | None,
          fresh: Any) -> Any:
    """Row-wise state lands on the segment's rows; other rows keep their fresh values."""
    if not isinstance(value, SparseRows):
        return value.clone() if torch.is_tensor(value) else value
    target = fresh.clone() if torch.is_tensor(fresh) else torch.zeros_like(param.detach())
    if segment is not None:
        ids, rows = segment
        value.copy_into(ids, target[rows])
    return target
