"""Strategy: turns a round's ClientUpdates into a new global model; shared aggregation math.

A strategy sees the global model as two parts (`ServerModel`): one flat dense vector and the
embedding tables. Aggregation of an embedding row only involves the clients that touched it,
so untouched rows are never dragged toward zero and the work scales with the touched rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fltoolkit.training.updates import (
    ClientRows,
    ClientUpdate,
    RoundRows,
    SparseRows,
    shared_round,
)


class AggregationError(ValueError):
    """Updates that cannot be aggregated (mismatched shapes or tables, no updates)."""


@dataclass
class ServerModel:
    """Views of the global model's parameters that strategies update in place.

    Attributes:
        dense: flat vector of every dense parameter (a copy; the loop writes it back).
        tables: table name -> weight [rows, E] of every table the server owns (local tables
            are not here).
    """

    dense: Tensor
    tables: dict[str, Tensor]


@dataclass(frozen=True)
class RowAverage:
    """A weighted mean of the clients' deltas of one table, over the rows they touched."""

    ids: Tensor
    mean: Tensor


def weighted_dense_mean(updates: list[ClientUpdate], weights: Tensor) -> Tensor:
    """sum_k w_k * delta_k / sum_k w_k over the dense deltas.

    Accumulated in place: stacking 1000 clients' deltas would double the round's memory.
    """
    total = torch.zeros_like(updates[0].dense)
    for update, weight in zip(updates, weights.tolist(), strict=True):
        total.add_(update.dense, alpha=weight)
    return total / weights.sum()


def weighted_row_means(updates: list[ClientUpdate], weights: Tensor, tables: dict[str, Tensor],
                       touched_only: bool = True) -> dict[str, RowAverage]:
    """Row-wise weighted mean of each table's deltas (`tables`: the server's weights, for
    their shapes), for the tables some update touched.

    With `touched_only`, row r's mean is sum_{k touched r} w_k delta_k[r] / sum_{k touched r} w_k;
    otherwise the denominator is sum over all clients (untouched rows count as zero deltas).
    Tables of one width are averaged together, their rows told apart by an offset, and
    updates that read one round layout (the trainer's) are reduced over its whole-round
    tensors: one unique and one index_add for the round, not a few small ops per client and
    table.
    """
    by_width: dict[int, list[str]] = {}
    for name, weight in tables.items():
        by_width.setdefault(weight.shape[1], []).append(name)
    shared = shared_round(updates)
    means = {}
    for names in by_width.values():
        pieces = (_round_pieces(updates, weights, shared, names) if shared is not None
                  else _client_pieces(updates, weights, names))
        if pieces is None:
            continue
        table, ids, values, row_weight = pieces
        sizes = [tables[name].shape[0] for name in names]
        offsets = torch.tensor([0, *sizes], dtype=torch.int64, device=ids.device).cumsum(0)
        if len(ids) and bool(((ids < 0) | (ids >= offsets[table + 1] - offsets[table])).any()):
            raise AggregationError(f"row ids outside the tables {names} in an update")
        unique, inverse = torch.unique(ids + offsets[table], return_inverse=True)
        total = values.new_zeros(unique.numel(), values.shape[1])
        total.index_add_(0, inverse, values * row_weight[:, None])
        if touched_only:
            denominator = values.new_zeros(unique.numel())
            denominator.index_add_(0, inverse, row_weight)
        else:
            denominator = weights.sum().expand(unique.numel())
        mean = total / denominator[:, None]
        bounds = torch.searchsorted(unique, offsets).tolist()
        for i, name in enumerate(names):
            if bounds[i + 1] > bounds[i]:
                rows = slice(bounds[i], bounds[i + 1])
                means[name] = RowAverage(unique[rows] - offsets[i], mean[rows])
    return means


Pieces = tuple[Tensor, Tensor, Tensor, Tensor]  # per row: table index, id, delta, weight


def _client_pieces(updates: list[ClientUpdate], weights: Tensor, names: list[str]
                   ) -> Pieces | None:
    """The rows of `names` of each update, update after update."""
    pieces = [(k, i, u.tables[name]) for k, u in enumerate(updates)
              for i, name in enumerate(names) if name in u.tables]
    if not pieces:
        return None
    device = weights.device
    counts = torch.tensor([rows.ids.shape[0] for _, _, rows in pieces], device=device)
    table = torch.repeat_interleave(torch.tensor([i for _, i, _ in pieces], device=device),
                                    counts)
    return (table, torch.cat([rows.ids for _, _, rows in pieces]),
            torch.cat([rows.values for _, _, rows in pieces]),
            torch.repeat_interleave(weights[[k for k, _, _ in pieces]], counts))


def _round_pieces(updates: list[ClientUpdate], weights: Tensor,
                  shared: dict[str, RoundRows], names: list[str]) -> Pieces | None:
    """The rows of `names` that `updates` hold in their round layout, table after table
    (within a table, client after client as in the round): a mask over each table's
    whole-round rows selects the updates' clients, when they are not all of them."""
    present = [(i, shared[name]) for i, name in enumerate(names) if name in shared]
    if not present:
        return None
    device = weights.device
    clients = len(present[0][1].bounds) - 1
    slots = torch.tensor([u.tables.slot for u in updates], device=device)
    weight_of = weights.new_zeros(clients).index_copy_(0, slots, weights)
    everyone = len(updates) == clients
    kept_of = torch.zeros(clients, dtype=torch.bool, device=device).index_fill_(0, slots, True)
    parts = []
    for i, rows in present:
        owners = rows.owners()
        ids, values, row_weight = rows.ids, rows.values, weight_of[owners]
        if not everyone:
            kept = kept_of[owners]
            ids, values, row_weight = ids[kept], values[kept], row_weight[kept]
        parts.append((i, ids, values, row_weight))
    table = torch.repeat_interleave(torch.tensor([i for i, *_ in parts], device=device),
                                    torch.tensor([len(ids) for _, ids, _, _ in parts],
                                                 device=device))
    return (table, torch.cat([ids for _, ids, _, _ in parts]),
            torch.cat([values for _, _, values, _ in parts]),
            torch.cat([weight for *_, weight in parts]))


def check_updates(updates: list[ClientUpdate], server: ServerModel) -> None:
    """Fail with a named error on shapes that would otherwise broadcast silently."""
    if not updates:
        raise AggregationError("no client updates to aggregate")
    for update in updates:
        if update.dense.shape != server.dense.shape:
            raise AggregationError(
                f"client {update.client}: dense delta of shape {tuple(update.dense.shape)}, "
                f"expected {tuple(server.dense.shape)}")
        if isinstance(update.tables, ClientRows):
            continue  # its round's layout is checked once, below
        for name, rows in update.tables.items():
            if name not in server.tables:
                raise AggregationError(f"client {update.client}: unknown table {name!r}")
            width = server.tables[name].shape[1]
            if rows.values.shape != (rows.ids.numel(), width):
                raise AggregationError(
                    f"client {update.client}: table {name!r} rows of shape "
                    f"{tuple(rows.values.shape)}, expected ({rows.ids.numel()}, {width})")
    layouts = {id(u.tables.round): u.tables.round for u in updates
               if isinstance(u.tables, ClientRows)}
    for layout in layouts.values():
        for name, rows in layout.items():
            if name not in server.tables:
                raise AggregationError(f"the round's updates: unknown table {name!r}")
            width = server.tables[name].shape[1]
            if rows.values.shape != (rows.ids.numel(), width) or rows.bounds[-1] != len(rows.ids):
                raise AggregationError(
                    f"the round's updates: table {name!r} rows of shape "
                    f"{tuple(rows.values.shape)}, expected ({rows.ids.numel()}, {width})")


class Strategy(ABC):
    """Server side of a federated algorithm. Subclasses set `name` and implement `aggregate`."""

    name = "strategy"

    @abstractmethod
    def aggregate(self, updates: list[ClientUpdate], server: ServerModel) -> None:
        """Apply one round's updates to `server` in place."""

    def hyperparameters(self) -> dict[str, Any]:
        """The knobs that define this run of the strategy (for logs and reports)."""
        return {}

    def summary(self) -> str:
        """One block naming the strategy and its hyper-parameters, logged at the start of a run."""
        lines = [self.name]
        lines += [f"  {key}: {value}" for key, value in self.hyperparameters().items()]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """Server optimizer state (for checkpoints); stateless strategies return {}."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        return


def apply_rows(table: Tensor, rows: SparseRows | RowAverage, scale: float = 1.0) -> None:
    """table[ids] += scale * values, in place."""
    ids = rows.ids
    values = rows.values if isinstance(rows, SparseRows) else rows.mean
    table.index_add_(0, ids, values, alpha=scale)


class StrategyWrapper(Strategy):
    """A cross-cutting concern (clipping, privacy, ...) around any strategy: it changes what
    reaches the inner strategy's `aggregate` and otherwise speaks for it (name, state,
    hyper-parameters), so concerns compose instead of multiplying subclasses.

    Args:
        strategy: the wrapped strategy.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{type(self).__name__}({self.strategy.name})"

    def own_hyperparameters(self) -> dict[str, Any]:
        """This wrapper's knobs (the inner strategy's are listed under `strategy`)."""
        return {}

    def hyperparameters(self) -> dict[str, Any]:
        return {**self.own_hyperparameters(), "strategy": self.strategy.name,
                **{f"strategy.{k}": v for k, v in self.strategy.hyperparameters().items()}}

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)
