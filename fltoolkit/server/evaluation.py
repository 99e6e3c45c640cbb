"""Evaluation of the global model on a whole split at once (batched, not client by client).

With client-local tables, each test row is scored with its own client's rows: the local
table's weight is swapped, for the evaluation only, for one holding every stored
(client, row) value, and the row ids are remapped to it. With sharded server tables the
same swap scores a rank's test rows with the rows it fetched from their owners.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

from datamodules.clients import ClientTable
from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.run.ranks import Ranks
from fltoolkit.server.tables import ServerTables
from recsys.metrics import ctr_metrics, group_auc
from recsys.parts import ModelParts


@dataclass(frozen=True)
class Evaluation:
    """Pooled metrics, per test client (raw id): test_rows and test_auc (null without both
    a click and a non-click), for the per-client AUC distribution in reports, and how many
    logits were not finite (a diverged model)."""

    metrics: dict[str, float]
    clients: pl.DataFrame
    non_finite: int = 0


@torch.no_grad()
def predict_logits(module: torch.nn.Module, table: ClientTable, batch_size: int,
                   sparse: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Logits of the table's `rows` (all by default) in that order; `sparse` replaces the
    table's ids when given."""
    module.eval()
    sparse = table.sparse if sparse is None else sparse
    dense = table.dense
    if rows is not None:
        dense, sparse = dense[rows], sparse[rows]
    device = next(module.parameters()).device  # batches go there; logits come back
    outputs = [module(dense[start:start + batch_size].to(device),
                      sparse[start:start + batch_size].to(device)).cpu()
               for start in range(0, dense.shape[0], batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0)


def evaluate(module: torch.nn.Module, parts: ModelParts, table: ClientTable, batch_size: int,
             train_clients: Tensor, local_tables: LocalTableStore | None = None,
             ranks: Ranks | None = None, server_tables: ServerTables | None = None
             ) -> Evaluation:
    """Metrics of the global model (with each client's local rows) on `table`.

    `train_clients` ([C] sorted raw client ids of the training table) maps a test row's client
    to the training client whose local rows score it. Under several `ranks`, each scores the
    rows of the clients it owns and the metrics are computed over the pooled logits; with
    sharded `server_tables` (collective) the rows it needs are fetched first.
    """
    ranks = ranks or Ranks()
    groups = table.row_clients()
    training_client = _training_client(table, groups, train_clients)
    # A test client unknown to training has no local rows: any rank can score it.
    owner = torch.where(training_client >= 0, training_client, groups) % ranks.world_size
    rows = torch.nonzero(owner == ranks.rank).reshape(-1) if ranks.distributed else None
    if server_tables is not None and server_tables.sharded:
        with _fetched_rows_swapped(parts, table, rows, server_tables) as sparse:
            logits = predict_logits(module, table, batch_size, sparse, rows)
    elif local_tables is None:
        logits = predict_logits(module, table, batch_size, rows=rows)
    else:
        with _client_rows_swapped(parts, table, training_client, local_tables) as sparse:
            logits = predict_logits(module, table, batch_size, sparse, rows)
    if rows is not None:
        logits = ranks.pooled(logits, rows, table.num_rows)
    positions, rows, client_auc = group_auc(logits, table.label, groups)
    clients = pl.DataFrame({"client": table.client_ids[positions].numpy(),
                            "test_rows": rows.astype("int64"), "test_auc": client_auc},
                           ).with_columns(pl.col("test_auc").fill_nan(None))
    return Evaluation(ctr_metrics(logits, table.label, groups), clients,
                      int((~torch.isfinite(logits)).sum()))


def _training_client(table: ClientTable, groups: Tensor, train_clients: Tensor) -> Tensor:
    """[N] position in the training table of each row's client, -1 where it has none."""
    raw = table.client_ids[groups]
    if not train_clients.numel():
        return torch.full_like(raw, -1)
    position = torch.searchsorted(train_clients, raw).clamp(max=train_clients.numel() - 1)
    return torch.where(train_clients[position] == raw, position, -1)


@contextmanager
def _weights_swapped(parts: ModelParts, weights: dict[str, Tensor]) -> Iterator[None]:
    """The named tables' weights replaced by `weights` inside the block."""
    originals = {name: parts.tables[name].weight.data for name in weights}
    try:
        for name, weight in weights.items():
            parts.tables[name].weight.data = weight
        yield
    finally:
        for name, data in originals.items():
            parts.tables[name].weight.data = data


@contextmanager
def _client_rows_swapped(parts: ModelParts, table: ClientTable, clients: Tensor,
                         store: LocalTableStore) -> Iterator[Tensor]:
    sparse = table.sparse.clone()
    weights = {}
    for name, part in parts.tables.items():
        if name not in store:
            continue
        for column in part.columns:
            weights[name], sparse[:, column] = store.evaluation_weight(
                name, clients, table.sparse[:, column])
    with _weights_swapped(parts, weights):
        yield sparse


@contextmanager
def _fetched_rows_swapped(parts: ModelParts, table: ClientTable, rows: Tensor | None,
                          server_tables: ServerTables) -> Iterator[Tensor]:
    """Each table's weight becomes the rows `rows` use (fetched), their ids remapped to it."""
    rows = torch.arange(table.num_rows) if rows is None else rows
    sparse = table.sparse.clone()
    requests = {}
    for name in server_tables.names:
        columns = torch.tensor(parts.tables[name].columns)
        requests[name], sparse[rows[:, None], columns] = torch.unique(
            table.sparse[rows[:, None], columns], return_inverse=True)
    with _weights_swapped(parts, server_tables.fetch(requests)):
        yield sparse
