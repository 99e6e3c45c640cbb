"""The model of a budgeted run: its shared tables built with their physical rows, not their
vocabulary, so a table under a budget never exists whole, on the server or on a client."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from datamodules.base import FeatureSpec
from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.run.config import ConfigError
from recsys.parts import embedding_tables


def table_budgets(config: EmbeddingBudgetConfig, sizes: dict[str, int]) -> dict[str, int]:
    """The rows of its own each budgeted shared table may give ids (`sizes`: the shared
    tables' ids; a table left out is held whole), or a one-line ConfigError."""
    try:
        return config.row_budget().split(sizes)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def physical_features(features: FeatureSpec, config: EmbeddingBudgetConfig,
                      local_tables: list[str]) -> FeatureSpec:
    """`features` with each budgeted table's cardinality replaced by its physical rows (its
    budget, plus the fallback row except with hashing; tables are named like their
    features, recsys.dlrm); unchanged with method none."""
    if not config.enabled:
        return features
    shared = {name: size for name, size in zip(features.sparse, features.cardinalities,
                                               strict=True) if name not in local_tables}
    budgets = table_budgets(config, shared)
    fallback = config.method != "hashing"
    sizes = [budgets[name] + fallback if name in budgets else size
             for name, size in zip(features.sparse, features.cardinalities, strict=True)]
    return replace(features, cardinalities=sizes)


def configure_budgeted_features(module: torch.nn.Module, features: FeatureSpec,
                                config: EmbeddingBudgetConfig, local_tables: list[str]) -> None:
    """Build `module` for `features` with budgeted shared tables, each started at the scale of
    its whole table (`start_at_logical_scale`)."""
    module.configure_features(physical_features(features, config, local_tables))
    start_at_logical_scale({name: weight for name, (weight, _) in
                            embedding_tables(module).items()}, features, config, local_tables)


def start_at_logical_scale(tables: dict[str, Tensor], features: FeatureSpec,
                           config: EmbeddingBudgetConfig, local_tables: list[str]) -> None:
    """Scale the initial draw of each budgeted table in `tables` (whole tables, or a rank's
    shards of them: the scale is per table), in place: TorchRec draws a table of R rows from
    U(+-sqrt(1/R)), so a small physical table would start with larger rows than the table of
    V ids it stands for; scaling by sqrt(R / V) gives U(+-sqrt(1/V)) without drawing again."""
    physical = physical_features(features, config, local_tables)
    with torch.no_grad():
        for name, rows, ids in zip(features.sparse, physical.cardinalities,
                                   features.cardinalities, strict=True):
            if rows != ids and name in tables:
                tables[name].mul_(math.sqrt(rows / ids))
