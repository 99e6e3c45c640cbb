"""Applying a strategy to the global model, with a guard against a diverging server step."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fltoolkit.run.ranks import Ranks
from fltoolkit.server.tables import ServerTables
from fltoolkit.strategies.base import ServerModel, Strategy
from fltoolkit.training.updates import ClientUpdate, table_ids


@torch.no_grad()
def aggregate_or_roll_back(strategy: Strategy, updates: list[ClientUpdate],
                           dense: list[nn.Parameter], server_tables: ServerTables,
                           ranks: Ranks) -> bool:
    """Apply the strategy to the dense parameters and the tables (or shards) this rank holds.

    If the new global weights are not finite on any rank, put back the old ones (only the
    rows the round touched can have changed, unless the strategy moves every row) and return
    False.
    """
    tables = server_tables.owned()
    updates = [server_tables.owned_part(update) for update in updates]
    touched: dict[str, Tensor | slice]
    if strategy.moves_every_row:  # every row: saved and checked as whole tables
        touched = {name: slice(None) for name in tables}
    else:
        touched = {name: torch.unique(ids) for name in tables
                   if (ids := table_ids(updates, name)) is not None}
    before = {name: tables[name][ids].clone() for name, ids in touched.items()}
    server = ServerModel(parameters_to_vector(dense).detach().clone(), tables)
    strategy.aggregate(updates, server)
    sums = [server.dense.sum(), *(tables[name][ids].sum() for name, ids in touched.items())]
    broken = not bool(torch.isfinite(torch.stack(sums)).all())
    if server_tables.sharded:  # a shard elsewhere may be the one that broke
        broken = ranks.any(broken)
    if broken:
        for name, ids in touched.items():
            tables[name][ids] = before[name]
        return False
    vector_to_parameters(server.dense, dense)
    return True
