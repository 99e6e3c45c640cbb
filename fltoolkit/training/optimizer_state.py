"""Local optimizer state: fresh for every client (RoundOptimizers), or kept per client.

ClientOptimizerStates keeps each client's state between its rounds, with
`federated.keep_optimizer_state: true`. State of dense parameters is kept whole. State shaped
like a table (Adagrad's sums, Adam's moments) is kept only for the rows the client touched,
keyed by global row id, because a round's compact layout of the tables differs from the last
one. Memory grows with the clients seen: a client costs its dense state plus its rows' state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fltoolkit.training.updates import SparseRows


class RoundOptimizers:
    """The module's local optimizers, built once per round and reset to fresh for each client.

    Resetting replaces building: `configure_optimizers` walks the whole module (about 1 ms
    here, as long as a one-step client's training). A reset puts back every state value as
    it was at construction and drops state created lazily (Adam's moments, SGD's momentum),
    except row-wise state of a table: a client's rows of the round's compact buffers were
    touched by no earlier client, so theirs is still fresh.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer],
                 tables: list[nn.Parameter]) -> None:
        self.optimizers = optimizers
        self.tables = {id(param) for param in tables}
        self.initial = [{param: dict(state) for param, state in optimizer.state.items()}
                        for optimizer in optimizers]
        for initial in self.initial:
            for param, state in initial.items():
                for key, value in state.items():
                    if torch.is_tensor(value) and not self._rowwise(param, value):
                        state[key] = value.clone()

    def reset(self) -> None:
        for optimizer, initial in zip(self.optimizers, self.initial, strict=True):
            for param in [p for p in optimizer.state if p not in initial]:
                del optimizer.state[param]
            for param, state in initial.items():
                live = optimizer.state[param]
                for key, value in state.items():
                    if torch.is_tensor(value) and not self._rowwise(param, value):
                        live[key] = value.clone()
                    elif not torch.is_tensor(value):
                        live[key] = value

    def _rowwise(self, param: nn.Parameter, value: Tensor) -> bool:
        return id(param) in self.tables and value.shape == param.shape


def as_optimizer_list(optimizers: object) -> list[torch.optim.Optimizer]:
    """configure_optimizers may return one optimizer, a list, or Lightning's dict form."""
    if isinstance(optimizers, dict):
        optimizers = optimizers["optimizer"]
    if isinstance(optimizers, (list, tuple)):
        return [o["optimizer"] if isinstance(o, dict) else o for o in optimizers]
    inner = getattr(optimizers, "optimizers", None)
    return list(inner) if inner else [optimizers]


class ClientOptimizerStates:
    """Saved optimizer states by client; tables are mapped by `segments` on save and load.

    `segments` maps each table parameter (currently a compact buffer) to the global row ids
    of the client's segment and the slice of the buffer that holds them.
    """

    def __init__(self) -> None:
        self.states: dict[int, list[dict[nn.Parameter, dict[str, Any]]]] = {}

    def snapshot(self, client: int, optimizers: list[torch.optim.Optimizer],
                 segments: dict[nn.Parameter, tuple[Tensor, slice]]) -> list[dict]:
        """The client's state after its round (copies, merged with what it kept before), to
        `put` once its update is accepted."""
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
        return saved

    def put(self, client: int, saved: list[dict]) -> None:
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

    def state_dict(self, parameters: list[nn.Parameter]) -> dict[int, list[dict[int, Any]]]:
        """Plain tensors keyed by each parameter's position in `parameters` (the module's
        order), so checkpoints need no pickled objects; row-wise state is ("rows", ids,
        values)."""
        position = {id(p): i for i, p in enumerate(parameters)}
        return {client: [{position[id(param)]: {key: _plain(value) for key, value in state.items()}
                          for param, state in params.items()} for params in saved]
                for client, saved in self.states.items()}

    def load_state_dict(self, state: dict[int, list[dict[int, Any]]],
                        parameters: list[nn.Parameter]) -> None:
        self.states = {client: [{parameters[i]: {key: _rows(value) for key, value in kept.items()}
                                 for i, kept in params.items()} for params in saved]
                       for client, saved in state.items()}


def _plain(value: Any) -> Any:
    return ("rows", value.ids, value.values) if isinstance(value, SparseRows) else value


def _rows(value: Any) -> Any:
    is_rows = isinstance(value, tuple) and len(value) == 3 and value[0] == "rows"
    return SparseRows(value[1], value[2]) if is_rows else value


def _save(value: Any, param: nn.Parameter, segment: tuple[Tensor, slice] | None,
          kept: Any) -> Any:
    if not torch.is_tensor(value):
        return value
    if segment is None or value.shape != param.shape:
        return value.clone()
    ids, rows = segment
    return kept_rows(ids, value[rows], kept)


def kept_rows(ids: Tensor, values: Tensor, kept: Any) -> SparseRows:
    """Row-wise state to keep: copies of these rows' `values` (`ids`: their global ids),
    merged into the rows kept before (`kept`, if SparseRows: rows of earlier rounds stay)."""
    if isinstance(kept, SparseRows):
        return kept.merged(ids, values)
    return SparseRows(ids.clone(), values.clone())


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
