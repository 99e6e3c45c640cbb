"""The model of a budgeted run: its shared tables built with their physical rows, not their
vocabulary, so a table under a budget never exists whole, on the server or on a client."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from datamodules.base import FeatureSpec
from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.run.config import ConfigError
from recsys.parts import embedding_tables


def physical_rows(config: EmbeddingBudgetConfig, num_ids: int) -> int:
    """Rows of a budgeted table of `num_ids` ids: the budget, plus the fallback row except
    with hashing."""
    try:
        budget = config.policy().rows(num_ids)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return budget + (config.method != "hashing")


def physical_features(features: FeatureSpec, config: EmbeddingBudgetConfig,
                      local_tables: list[str]) -> FeatureSpec:
    """`features` with each shared table's cardinality replaced by its physical rows (tables
    are named like their features, recsys.dlrm); unchanged with method none."""
    if not config.enabled:
        return features
    sizes = [size if name in local_tables else physical_rows(config, size)
             for name, size in zip(features.sparse, features.cardinalities, strict=True)]
    return replace(features, cardinalities=sizes)


def configure_budgeted_features(module: torch.nn.Module, features: FeatureSpec,
                                config: EmbeddingBudgetConfig, local_tables: list[str]) -> None:
    """Build `module` for `features` with budgeted shared tables, each started at the scale of
    its whole table: TorchRec draws a table of R rows from U(+-sqrt(1/R)), so a small physical
    table would start with larger rows than the table it stands for; scaling the draw by
    sqrt(R / V) gives U(+-sqrt(1/V)) without drawing again."""
    module.configure_features(physical_features(features, config, local_tables))
    if not config.enabled:
        return
    logical = dict(zip(features.sparse, features.cardinalities, strict=True))
    with torch.no_grad():
        for name, (weight, _) in embedding_tables(module).items():
            if name not in local_tables and name in logical:
                weight.mul_(math.sqrt(weight.shape[0] / logical[name]))
