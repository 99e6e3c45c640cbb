"""Shared embedding tables under a memory budget: the budget's rows per table (allocation), a
map from each table's logical ids to its physical rows (row_map), AdaEmbed-style importance
of every id (importance), pruning and re-admission within the budget (budget), and the
frequency-threshold and hashing baselines at the same budget (baselines)."""

from fltoolkit.embeddings.allocation import RowBudget
from fltoolkit.embeddings.baselines import frequency_map, hashed_map, training_counts
from fltoolkit.embeddings.budget import BudgetPolicy, Rebalance, initialize_admitted
from fltoolkit.embeddings.importance import RoundSignal, RowImportance, round_signal
from fltoolkit.embeddings.row_map import RowMap

__all__ = ["BudgetPolicy", "Rebalance", "RoundSignal", "RowBudget", "RowImportance", "RowMap",
           "frequency_map", "hashed_map", "initialize_admitted", "round_signal",
           "training_counts"]
