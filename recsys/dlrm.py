"""DLRM built from TorchRec's arches over an EmbeddingBagCollection with sparse gradients.

Dense-gradient tables cost O(table size) per step (and, with Adam, move every row through
momentum); sparse gradients keep a step proportional to the rows a batch touches, which
is also what makes a federated client's update a handful of rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.table_init import embedding_bag_collection

# The sparse gradients of the tables are built by torch itself and are valid by construction;
# opting out explicitly also silences torch's warning that checks are implicitly off.
torch.sparse.check_sparse_tensor_invariants.disable()


def build_embedding_bags(
    features: list[str], cardinalities: list[int], embedding_dim: int, sparse_grad: bool = True
) -> EmbeddingBagCollection:
    """One table per feature, named like the feature (`user`, `adgroup_id`, ...); on the meta
    device when built for sharded tables (see recsys.table_init)."""
    tables = [
        EmbeddingBagConfig(
            name=name, embedding_dim=embedding_dim, num_embeddings=size, feature_names=[name]
        )
        for name, size in zip(features, cardinalities, strict=True)
    ]
    collection = embedding_bag_collection(tables)
    for bag in collection.embedding_bags.values():
        bag.sparse = sparse_grad
    return collection


def build_dlrm(
    features: list[str],
    cardinalities: list[int],
    num_dense: int,
    embedding_dim: int = 16,
    dense_hidden: list[int] | None = None,
    over_hidden: list[int] | None = None,
    sparse_grad: bool = True,
) -> DLRM:
    """torchrec's DLRM: dense MLP to `embedding_dim`, pairwise dots, over MLP to one logit.

    B: batch size, F: sparse features, D: dense features.
    Input: dense [B, D] float, KeyedJaggedTensor of F single-id features. Output: logits [B, 1].
    The over arch ends in a plain Linear: no sigmoid inside the model.
    """
    dense_sizes = [*(dense_hidden if dense_hidden is not None else [64]), embedding_dim]
    over_sizes = [*(over_hidden if over_hidden is not None else [128, 64]), 1]
    return DLRM(
        embedding_bag_collection=build_embedding_bags(
            features, cardinalities, embedding_dim, sparse_grad),
        dense_in_features=max(num_dense, 1),
        dense_arch_layer_sizes=dense_sizes,
        over_arch_layer_sizes=over_sizes,
    )


def dense_input(dense: torch.Tensor) -> torch.Tensor:
    """What the dense arch takes for dense features [..., D]: them, or one constant column
    when there are none (`build_dlrm` gives the arch at least one input)."""
    return dense if dense.shape[-1] else dense.new_zeros(*dense.shape[:-1], 1)


class SingleIdFeatures(nn.Module):
    """Turns a [B, F] tensor of ids (one id per feature per row) into a KeyedJaggedTensor.

    A KJT is key-major: all B ids of feature 0, then of feature 1, ...; every length is 1.
    """

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.keys = list(keys)

    def forward(self, ids: torch.Tensor) -> KeyedJaggedTensor:
        lengths = torch.ones(ids.numel(), dtype=torch.int32, device=ids.device)
        return KeyedJaggedTensor(keys=self.keys, values=ids.t().reshape(-1), lengths=lengths)
