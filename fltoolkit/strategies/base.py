"""Strategy: turns a round's ClientUpdates into a new global model; shared aggregation math.

A strategy sees the global model as two parts (`ServerModel`): one flat dense vector and the
embedding tables. Aggregation of an embedding row only involves the clients that touched it,
so untouched rows are never dragged toward zero and the work scales with the touched rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fltoolkit.training.updates import (
    ClientRows,
    ClientUpdate,
    PlannedUploads,
    RoundRows,
    SparseRows,
    plain_upload_bytes,
    shared_round,
)


class AggregationError(ValueError):
    """Updates that cannot be aggregated (mismatched shapes or tables, no updates)."""


class RoundFailed(RuntimeError):
    """The strategy's protocol yields no aggregate this round (e.g. too few secure-aggregation
    survivors): the global model stays as it was and the round is counted as failed."""


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


class RowSum(NamedTuple):
    """A weighted sum of one table's row deltas over the clients that touched each row.

    Attributes:
        ids: [U] sorted row ids that some client touched.
        values: [U, E] sum over the clients k that touched row r of w_k * delta_k[r].
        weights: [U] sum of those clients' w_k (a row's touched-only denominator).
    """

    ids: Tensor
    values: Tensor
    weights: Tensor


def weighted_dense_sum(updates: list[ClientUpdate], weights: Tensor) -> Tensor:
    """sum_k w_k * delta_k over the dense deltas.

    Accumulated in place: stacking 1000 clients' deltas would double the round's memory.
    """
    total = torch.zeros_like(updates[0].dense)
    for update, weight in zip(updates, weights.tolist(), strict=True):
        total.add_(update.dense, alpha=weight)
    return total


def weighted_row_sums(updates: list[ClientUpdate], weights: Tensor, tables: dict[str, Tensor],
                      scales: Tensor | None = None) -> dict[str, RowSum]:
    """Row-wise weighted sums of each table's deltas (`tables`: the server's weights, for
    their shapes), for the tables some update touched; with `scales`, client k's deltas
    count as scales[k] * weights[k] * delta_k while its weight in the row's sum of weights
    stays weights[k] (clipping that must not change the denominators).

    Tables of one width are summed together, their rows told apart by an offset, and
    updates that read one round layout (the trainer's) are reduced over its whole-round
    tensors: one unique and one index_add for the round, not a few small ops per client and
    table.
    """
    by_width: dict[int, list[str]] = {}
    for name, weight in tables.items():
        by_width.setdefault(weight.shape[1], []).append(name)
    shared = shared_round(updates)
    sums = {}
    for names in by_width.values():
        both = torch.stack([weights, weights if scales is None else weights * scales], 1)
        pieces = (_round_pieces(updates, both, shared, names) if shared is not None
                  else _client_pieces(updates, both, names))
        if pieces is None:
            continue
        table, ids, values, row_weight = pieces
        sizes = [tables[name].shape[0] for name in names]
        offsets = torch.tensor([0, *sizes], dtype=torch.int64, device=ids.device).cumsum(0)
        if len(ids) and bool(((ids < 0) | (ids >= offsets[table + 1] - offsets[table])).any()):
            raise AggregationError(f"row ids outside the tables {names} in an update")
        unique, inverse = torch.unique(ids + offsets[table], return_inverse=True)
        total = values.new_zeros(unique.numel(), values.shape[1])
        total.index_add_(0, inverse, values * row_weight[:, 1:])
        denominator = values.new_zeros(unique.numel()).index_add_(0, inverse, row_weight[:, 0])
        bounds = torch.searchsorted(unique, offsets).tolist()
        for i, name in enumerate(names):
            if bounds[i + 1] > bounds[i]:
                rows = slice(bounds[i], bounds[i + 1])
                sums[name] = RowSum(unique[rows] - offsets[i], total[rows], denominator[rows])
    return sums


Pieces = tuple[Tensor, Tensor, Tensor, Tensor]  # per row: table index, id, delta, weights


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
            torch.repeat_interleave(weights[[k for k, _, _ in pieces]], counts, dim=0))


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
    weight_of = weights.new_zeros(clients, *weights.shape[1:]).index_copy_(0, slots, weights)
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


class Uploads(NamedTuple):
    """What a round's updates put on the clients' uplinks: bytes, and the row deltas the
    server receives."""

    bytes: int
    rows: int


def plain_uploads(updates: list[ClientUpdate]) -> Uploads:
    """What `updates` cost to send as they are: each client's own update."""
    return Uploads(sum(u.upload_bytes() for u in updates), sum(u.num_rows() for u in updates))


class Strategy(ABC):
    """Server side of a federated algorithm. Subclasses set `name` and implement `aggregate`."""

    name = "strategy"
    moves_every_row = False  # True: a step may change rows no update touched (DP noise)

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

    def uploads(self, updates: list[ClientUpdate]) -> Uploads:
        """What `updates` cost to send under this strategy's protocol."""
        return plain_uploads(updates)

    def planned_upload_bytes(self, planned: PlannedUploads) -> np.ndarray:
        """[C] what each client of a planned cohort will upload under this strategy's
        protocol, known before anyone trains so the simulated clock can charge it."""
        return plain_upload_bytes(planned)

    def start_round(self, round_index: int, cohort: list[int], seed: int) -> None:
        """Called before the cohort trains: for protocols that start with the cohort (secure
        aggregation's key agreement) or draw the round's randomness (DP noise) from the
        run's seed, so that a resumed run draws the same."""
        return

    def reset_rows(self, table: str, rows: Tensor) -> None:
        """Forget any per-row state of `rows` of `table`: they now embed other ids (a
        re-balanced budgeted table, fltoolkit.embeddings). Stateless strategies keep none."""
        return

    def state_dict(self) -> dict[str, Any]:
        """Server optimizer state (for checkpoints); stateless strategies return {}."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        return


def apply_rows(table: Tensor, rows: SparseRows, scale: float = 1.0) -> None:
    """table[ids] += scale * values, in place (ids unique and in range: as many as the table
    has rows means all of them, in order, as DP's noised mean gives)."""
    if rows.ids.numel() == table.shape[0]:
        table.add_(rows.values, alpha=scale)
    else:
        table.index_add_(0, rows.ids, rows.values, alpha=scale)


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

    @property
    def moves_every_row(self) -> bool:  # type: ignore[override]
        return self.strategy.moves_every_row

    def own_hyperparameters(self) -> dict[str, Any]:
        """This wrapper's knobs (the inner strategy's are listed under `strategy`)."""
        return {}

    def hyperparameters(self) -> dict[str, Any]:
        return {**self.own_hyperparameters(), "strategy": self.strategy.name,
                **{f"strategy.{k}": v for k, v in self.strategy.hyperparameters().items()}}

    def uploads(self, updates: list[ClientUpdate]) -> Uploads:
        return self.strategy.uploads(updates)

    def planned_upload_bytes(self, planned: PlannedUploads) -> np.ndarray:
        return self.strategy.planned_upload_bytes(planned)

    def start_round(self, round_index: int, cohort: list[int], seed: int) -> None:
        self.strategy.start_round(round_index, cohort, seed)

    def reset_rows(self, table: str, rows: Tensor) -> None:
        self.strategy.reset_rows(table, rows)

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)
