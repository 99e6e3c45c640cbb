"""Where the server's embedding tables live: whole in this process, or sharded across ranks.

The round loop touches server tables in three ways only: it reads rows (a cohort's start
values, the rows its test split scores with), it aggregates a round's row deltas into them,
and it saves them. Going through `ServerTables` lets the same loop run on whole tables or on
TorchRec shards (`recsys.sharding`), where no rank ever holds a whole table: rows are fetched
from their owners, and each rank applies the strategy to the part of every update its shards
cover, so its strategy state (e.g. FedAdam's row moments) is shard-sized too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from fltoolkit.training.updates import ClientUpdate, SparseRows
from recsys.sharding import ShardedTables


class ServerTables:
    """Whole tables held by this process (every rank alike when several share a cohort).

    Args:
        weights: table name -> weight [rows, E] of every table the server owns (client-local
            tables are not here).
    """

    sharded = False

    def __init__(self, weights: dict[str, Tensor]) -> None:
        self.weights = weights

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def fetch(self, requests: dict[str, Tensor]) -> dict[str, Tensor]:
        """The current rows [R, E] at ids [R] of each named table (copies). Collective when
        sharded: every rank calls it, naming every table, in the same order."""
        return {name: self.weights[name][ids] for name, ids in requests.items()}

    def owned(self) -> dict[str, Tensor]:
        """The tensors this rank's strategy updates in place (see `owned_part`)."""
        return self.weights

    def owned_part(self, update: ClientUpdate) -> ClientUpdate:
        """The part of `update` that `owned()` covers."""
        return update

    def state_dict(self) -> dict[str, Any] | None:
        """This rank's share of the tables for its own checkpoint file; None when the tables
        are whole (they are in the module's state)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("this run's tables are not sharded, but the checkpoint holds shards")


class ShardedServerTables(ServerTables):
    """Tables sharded across the ranks (table- or column-wise) by TorchRec."""

    sharded = True

    def __init__(self, tables: ShardedTables) -> None:
        self.tables = tables
        owned = tables.owned()
        self.columns = {name: slice(first, first + shard.shape[1])
                        for name, (first, shard) in owned.items()}
        super().__init__({name: shard for name, (_, shard) in owned.items()})

    @property
    def names(self) -> list[str]:
        return self.tables.names

    def fetch(self, requests: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.tables.fetch(requests)

    def owned_part(self, update: ClientUpdate) -> ClientUpdate:
        """The rows of the tables this rank holds, cut to its columns; the norm stays the
        whole update's."""
        tables = {name: SparseRows(rows.ids, rows.values[:, self.columns[name]])
                  for name, rows in update.tables.items() if name in self.columns}
        return replace(update, tables=tables, whole=update)

    def state_dict(self) -> dict[str, Any]:
        return self.tables.state_dict_local()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tables.load_state_dict_local(state)
