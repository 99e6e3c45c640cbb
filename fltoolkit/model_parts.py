"""Which parameters of a module are embedding tables (and which sparse columns feed them).

The federated code treats tables row-wise and everything else as one flat dense vector. It
finds the tables by looking for TorchRec EmbeddingBagCollections inside the module, so a user's
own CTRModule subclass federates as long as its tables live in an EmbeddingBagCollection fed
by the columns of `features.sparse` named like their features.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection


@dataclass(frozen=True)
class TablePart:
    """One embedding table: its weight [rows, E] and the ClientTable.sparse columns it embeds.
    With sharded server tables (recsys.sharding) the weight is an empty [0, E] placeholder and
    `num_rows` the table's true size."""

    weight: nn.Parameter
    columns: list[int]
    num_rows: int


@dataclass(frozen=True)
class ModelParts:
    """The module's parameters split into dense ones (in a fixed order) and tables by name."""

    dense: list[nn.Parameter]
    tables: dict[str, TablePart]


def split_parameters(module: nn.Module, sparse_features: list[str]) -> ModelParts:
    """Find every EmbeddingBagCollection table and map its features to sparse columns."""
    tables: dict[str, TablePart] = {}
    for collection in module.modules():
        if not isinstance(collection, EmbeddingBagCollection):
            continue
        for config in collection.embedding_bag_configs():
            missing = [f for f in config.feature_names if f not in sparse_features]
            if missing:
                raise ValueError(f"table {config.name!r} embeds features {missing} that are not "
                                 f"among the data's sparse features {sparse_features}")
            weight = collection.embedding_bags[config.name].weight
            columns = [sparse_features.index(f) for f in config.feature_names]
            tables[config.name] = TablePart(weight, columns, config.num_embeddings)
    table_ids = {id(part.weight) for part in tables.values()}
    dense = [p for p in module.parameters() if id(p) not in table_ids and p.requires_grad]
    return ModelParts(dense, tables)
