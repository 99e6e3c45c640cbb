"""A run's budgeted tables: the row map of each shared table, and, under adaembed, the
importance that re-balances them between rounds.

The loop asks it three things: which physical rows logical ids use (planning a cohort,
evaluating), what a round taught the importance (the accepted clients' logical ids and the
rows' aggregated deltas), and, when due, to re-balance the maps, start the admitted rows from
the fallback and drop the server optimizer's state of those rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from datamodules.clients import ClientTable
from fltoolkit.embeddings.baselines import frequency_map, hashed_map, training_counts
from fltoolkit.embeddings.budget import initialize_admitted
from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.embeddings.importance import RowImportance, round_signal
from fltoolkit.embeddings.physical import table_budgets
from fltoolkit.embeddings.row_map import RowMap
from fltoolkit.run.config import ConfigError
from fltoolkit.strategies.base import Strategy, weighted_row_sums
from fltoolkit.training.cohort import Cohort
from fltoolkit.training.updates import ClientUpdate
from recsys.parts import TablePart


class BudgetedTables:
    """The row maps (and importance) of the shared tables of one run.

    Args:
        config: the embeddings section (method not none).
        tables: the shared tables (recsys.parts), built with their physical rows; those the
            budget holds whole (fltoolkit.embeddings.allocation) get no map.
        cardinalities: the vocabulary of each sparse column (the data's FeatureSpec).
        train: the training ClientTable (frequency counts).
        seed: the run's seed (hashing).

    Adaembed starts with every id on the fallback row by default: the server knows nothing of
    the ids before clients report them, and the frequency map would hand it the training
    data's per-id counts, which no client sends. The first re-balance, after round 1, then
    gives rows to the ids the first cohort touched. `start: counts` starts it from the
    frequency map instead (and re-balances only when due).
    """

    def __init__(self, config: EmbeddingBudgetConfig, tables: dict[str, TablePart],
                 cardinalities: list[int], train: ClientTable, seed: int) -> None:
        self.config, self.policy = config, config.policy()
        sizes = {name: max(cardinalities[column] for column in part.columns)
                 for name, part in tables.items()}
        budgets = table_budgets(config, sizes)
        self.whole_rows = sum(size for name, size in sizes.items() if name not in budgets)
        self.maps: dict[str, RowMap] = {}
        self.columns = {name: tables[name].columns for name in budgets}
        for name, budget in budgets.items():
            part, num_ids = tables[name], sizes[name]
            if config.method == "adaembed" and config.start == "fallback":
                row_map = RowMap.all_fallback(num_ids, budget)
            elif config.method in ("adaembed", "frequency"):
                row_map = frequency_map(training_counts(train.sparse, part.columns, num_ids),
                                        budget)
            else:
                row_map = hashed_map(num_ids, budget, seed)
            if part.num_rows != row_map.physical_rows:
                raise ConfigError(f"table {name!r} has {part.num_rows} rows, but embeddings."
                                  f"budget gives it {row_map.physical_rows}: build the model "
                                  "with fltoolkit.embeddings.configure_budgeted_features")
            self.maps[name] = row_map
        # what the row sums need of a table: its shape (a rank may hold none of it, sharding)
        self.shapes = {name: torch.empty(self.maps[name].physical_rows,
                                         tables[name].weight.shape[1], device="meta")
                       for name in self.maps}
        self.importance = (RowImportance({n: m.num_ids for n, m in self.maps.items()},
                                         config.decay, config.importance)
                           if config.method == "adaembed" else None)

    def mapped(self, split: ClientTable) -> ClientTable:
        """`split` with the budgeted tables' columns holding physical rows (evaluation)."""
        sparse = split.sparse.clone()
        for name, columns in self.columns.items():
            sparse[:, columns] = self.maps[name].lookup(split.sparse[:, columns])
        return replace(split, sparse=sparse)

    def end_round(self, round_index: int, cohort: Cohort | None, accepted: list[ClientUpdate],
                  server_tables: dict[str, Tensor], strategy: Strategy) -> dict[str, int]:
        """Learn from the round (adaembed), re-balance when due; rounds.csv's columns."""
        evicted = admitted = 0
        if self.importance is not None:
            self._observe(cohort, accepted)
            cold = round_index == 1 and self.config.start == "fallback"
            if cold or self.policy.due(round_index - 1):
                evicted, admitted = self._rebalance(server_tables, strategy)
        return {"table_rows": self.whole_rows + sum(m.physical_rows for m in self.maps.values()),
                "rows_evicted": evicted, "rows_admitted": admitted}

    def _observe(self, cohort: Cohort | None, accepted: list[ClientUpdate]) -> None:
        """Every table's importance takes one round: the accepted clients' logical ids and the
        FedAvg mean delta of each physical row they trained (every score decays)."""
        slot_of = {client: slot for slot, client in enumerate(cohort.clients)} if cohort else {}
        slots = [slot_of[update.client] for update in accepted]
        sums = {}
        if accepted:
            weights = torch.tensor([float(u.num_samples) for u in accepted],
                                   device=accepted[0].dense.device)
            sums = weighted_row_sums(accepted, weights, self.shapes)
        for name, row_map in self.maps.items():
            touched = (cohort.logical_rows(name, slots) if slots
                       else torch.zeros(0, dtype=torch.int64))
            rows = sums.get(name)
            if rows is not None:
                rows = type(rows)(*(tensor.cpu() for tensor in rows))
            self.importance.update(name, round_signal(touched, row_map, rows))

    def _rebalance(self, server_tables: dict[str, Tensor], strategy: Strategy
                   ) -> tuple[int, int]:
        """Re-balance every table's map (the same on every rank: they see the same updates);
        the admitted rows start from the fallback in the tables or shards this rank holds
        (`server_tables`). (ids evicted, ids admitted) over the tables."""
        evicted = admitted = 0
        for name, row_map in self.maps.items():
            change = self.policy.rebalance(row_map, self.importance.scores[name])
            if name in server_tables:
                rows = change.changed_rows.to(server_tables[name].device)
                initialize_admitted(server_tables[name], change._replace(changed_rows=rows),
                                    row_map)
                strategy.reset_rows(name, rows)
            evicted, admitted = evicted + len(change.evicted), admitted + len(change.admitted)
        return evicted, admitted

    def state_dict(self) -> dict[str, Any]:
        return {"maps": {name: m.state_dict() for name, m in self.maps.items()},
                "importance": self.importance.state_dict() if self.importance else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, row_map in self.maps.items():
            row_map.load_state_dict(state["maps"][name])
        if self.importance is not None:
            self.importance.load_state_dict(state["importance"])
