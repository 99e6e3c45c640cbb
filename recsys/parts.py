"""Which parameters of a module are embedding tables (and which sparse columns feed them).

The one place that finds a model's tables: the model's own optimizer split (CTRModule's
`configure_optimizers`: sparse gradients for tables, dense for the rest) and fltk's federated
code (tables row-wise, everything else one flat vector) both ask here, so they always agree.
Tables are the weights of the TorchRec EmbeddingBagCollections inside the module, so a user's
own CTRModule subclass works as long as its tables live in one, fed by the columns of
`features.sparse` named like their features.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
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


def embedding_tables(module: nn.Module) -> dict[str, tuple[nn.Parameter, EmbeddingBagConfig]]:
    """Every table of every EmbeddingBagCollection in `module`: name -> (weight, config)."""
    return {config.name: (collection.embedding_bags[config.name].weight, config)
            for collection in module.modules() if isinstance(collection, EmbeddingBagCollection)
            for config in collection.embedding_bag_configs()}


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that are not embedding tables, in `parameters()` order."""
    tables = {id(weight) for weight, _ in embedding_tables(module).values()}
    return [p for p in module.parameters() if id(p) not in tables and p.requires_grad]


def split_parameters(module: nn.Module, sparse_features: list[str]) -> ModelParts:
    """The dense parameters, and every table with the sparse columns of its features."""
    tables: dict[str, TablePart] = {}
    for name, (weight, config) in embedding_tables(module).items():
        missing = [f for f in config.feature_names if f not in sparse_features]
        if missing:
            raise ValueError(f"table {name!r} embeds features {missing} that are not "
                             f"among the data's sparse features {sparse_features}")
        columns = [sparse_features.index(f) for f in config.feature_names]
        tables[name] = TablePart(weight, columns, config.num_embeddings)
    return ModelParts(dense_parameters(module), tables)
