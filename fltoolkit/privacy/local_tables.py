"""LocalTableStore: per-client rows of tables that stay on the client (e.g. the user table).

A local table is trained on the client and used to score that client's rows, but its rows
never appear in an update or in the server's state. The global model keeps the table's
initial values (it is never aggregated), and each client's trained rows live here, keyed by
client, so clients sharing a row id (a local ad table) each keep their own copy. They are
kept in host memory, which grows with the clients seen, whatever device trains them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fltoolkit.training.updates import SparseRows, find_sorted


class LocalTableStore:
    """Client rows of each local table. V: table rows, E: embedding dim.

    Args:
        initial: table name -> the global [V, E] weight, which holds the initial values of every
            row a client has not trained yet (the server never changes it).
    """

    def __init__(self, initial: dict[str, Tensor]) -> None:
        self.initial = initial
        self.rows: dict[str, dict[int, SparseRows]] = {name: {} for name in initial}

    def __contains__(self, table: str) -> bool:
        return table in self.initial

    def client_rows(self, table: str, client: int, ids: Tensor) -> Tensor:
        """The client's values of rows `ids` ([R] sorted unique): stored ones, else initial."""
        values = self.initial[table].detach()[ids]
        stored = self.rows[table].get(client)
        if stored is None:
            return values
        host = values.cpu()  # the same tensor when training on the host
        stored.copy_into(ids.cpu(), host)
        return host.to(values.device)

    def save(self, table: str, client: int, ids: Tensor, values: Tensor) -> None:
        """Keep the client's new values of rows `ids`; its other stored rows stay."""
        ids, values = ids.cpu(), values.cpu()
        stored = self.rows[table].get(client) or SparseRows(ids[:0], values[:0])
        self.rows[table][client] = stored.merged(ids, values)

    def evaluation_weight(self, table: str, clients: Tensor, ids: Tensor
                          ) -> tuple[Tensor, Tensor]:
        """A weight and remapped ids so that row n is scored with client[n]'s own row ids[n].

        The weight is the initial table followed by every stored (client, row) value; ids of
        stored pairs point past the initial rows. Clients < 0 (unknown) use initial values.
        """
        weight = self.initial[table].detach()
        vocab = weight.shape[0]
        stored = self.rows[table]
        if not stored:
            return weight, ids
        keys = torch.cat([c * vocab + rows.ids for c, rows in sorted(stored.items())])
        values = torch.cat([rows.values for _, rows in sorted(stored.items())])
        wanted = torch.where(clients >= 0, clients * vocab + ids, -1)
        position, hit = find_sorted(keys, wanted)
        remapped = torch.where(hit, vocab + position, ids)
        return torch.cat([weight, values.to(weight.device)]), remapped

    def state_dict(self) -> dict[str, dict[int, tuple[Tensor, Tensor]]]:
        """Every stored (client, rows) pair, for checkpoints (the initial weights are the
        module's own and are checkpointed with it)."""
        return {table: {client: (rows.ids, rows.values) for client, rows in stored.items()}
                for table, stored in self.rows.items()}

    def load_state_dict(self, state: dict[str, dict[int, tuple[Tensor, Tensor]]]) -> None:
        self.rows = {table: {client: SparseRows(ids, values)
                             for client, (ids, values) in stored.items()}
                     for table, stored in state.items()}

    def num_rows(self) -> int:
        return sum(rows.ids.numel() for table in self.rows.values() for rows in table.values())

