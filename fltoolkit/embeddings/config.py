"""The `embeddings` section of an experiment: shared tables held under a memory budget of rows
(AdaEmbed-style pruning, or the frequency-threshold and hashing baselines at the same budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fltoolkit.embeddings.allocation import KEEP_WHOLE, RowBudget, Scope
from fltoolkit.embeddings.budget import BudgetPolicy
from fltoolkit.embeddings.importance import RowImportance, Signal
from fltoolkit.run.config import ConfigError, FederatedConfig

Method = Literal["none", "adaembed", "frequency", "hashing"]
Start = Literal["fallback", "counts"]


@dataclass
class EmbeddingBudgetConfig:
    """How the shared (uploaded) tables fit a budget; client-local tables stay whole.

    Args:
        method: `none` (whole tables, the default), `adaembed` (rows follow importance,
            re-balanced every `prune_interval` rounds), `frequency` (the ids most frequent in
            the training data keep rows) or `hashing` (ids hashed into the rows).
        budget: rows ids may own: a fraction of the ids in (0, 1], or an int >= 1 of rows;
            of all shared tables together or of each (`scope`). Pruning and frequency add
            one shared fallback row per table for the ids without one.
        scope: `total` (the default: one budget over all shared tables, split once in
            proportion to their ids after the small tables are held whole) or `table`.
        keep_whole: shared tables of at most this many ids are held whole, in either scope
            (fltoolkit.embeddings.allocation says why); 0 budgets every table.
        prune_interval: adaembed: rounds between re-balances (from the fallback start, also
            one after round 1, which fills the rows of a table that starts with every id on
            the fallback).
        decay: adaembed: the weight of the past in the importance's moving average, [0, 1).
            Per round: a client returns hundreds of rounds later, so the memory must be long
            (validation AUC at half the rows of every table, default experiment: 0.7361 /
            0.7406 / 0.7519 / 0.7469 with 0.9 / 0.95 / 0.99 / 0.999).
        hysteresis: adaembed: how much an id holding a row is favoured when ranking (>= 0).
        importance: adaembed: what a touched id gains per round, `clients_x_norm` (AdaEmbed's
            use times movement) or `clients` (fltoolkit.embeddings.importance says when).
        start: adaembed: `fallback` (every id on the fallback: the server knows no id before
            clients report them) or `counts` (the frequency threshold's rows: the training
            data's per-id counts, which a deployment would gather as a federated histogram
            before training, so pruning and the threshold start from the same information).
    """

    method: Method = "none"
    budget: int | float = 1.0
    scope: Scope = "total"
    keep_whole: int = KEEP_WHOLE
    prune_interval: int = 10
    decay: float = 0.99
    hysteresis: float = 0.0
    importance: Signal = "clients_x_norm"
    start: Start = "fallback"

    def __post_init__(self) -> None:
        if self.method == "none" and self.budget != 1.0:
            raise ValueError(f"embeddings.budget {self.budget} is set but embeddings.method is "
                             "none: choose adaembed, frequency or hashing")
        if self.start not in ("fallback", "counts"):
            raise ValueError(f"embeddings.start must be fallback or counts, got {self.start!r}")
        self.row_budget(), self.policy()  # their own checks
        RowImportance({}, self.decay, self.importance)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def row_budget(self) -> RowBudget:
        return RowBudget(self.budget, self.scope, self.keep_whole)

    def policy(self) -> BudgetPolicy:
        return BudgetPolicy(self.prune_interval, self.hysteresis)

    def check_run(self, federated: FederatedConfig, *, privacy: bool) -> None:
        """Refuse, in one line, what budgeted tables do not run with (yet)."""
        if not self.enabled:
            return
        if not federated.enabled:
            raise ConfigError(f"embeddings.method {self.method} applies to federated runs: set "
                              "federated.enabled true or embeddings.method none")
        if federated.mode != "sync":
            raise ConfigError(f"embeddings.method {self.method} with federated.mode "
                              f"{federated.mode} is refused for now: rows are re-balanced "
                              "between synchronous rounds")
        if privacy:
            raise ConfigError(f"embeddings.method {self.method} with the privacy section "
                              "enabled is refused for now: the importance needs each client's "
                              "ids and each row's mean delta, which DP and secure aggregation "
                              "hide")
        if self.method == "adaembed" and federated.keep_optimizer_state:
            raise ConfigError("embeddings.method adaembed with federated.keep_optimizer_state "
                              "is refused for now: a re-balanced row's kept client state "
                              "belongs to its previous id")
