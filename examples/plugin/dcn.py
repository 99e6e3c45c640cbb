"""DCNModule: CTRModule with a DCN-v2 interaction (TorchRec's DLRM_DCN) instead of dot products.

DLRM_DCN keeps DLRM's sparse, dense, interaction and over arches, so CTRModule's forward,
training_step (logits, BCE, per-sample losses), optimizer split and `prior_bias` apply as they
are, and its tables stay in an EmbeddingBagCollection named like the sparse features:
federation finds them unchanged. Only `build_network` is overridden.
"""

from __future__ import annotations

from torch import nn
from torchrec.models.dlrm import DLRM_DCN

from datamodules.base import FeatureSpec
from recsys.dlrm import build_embedding_bags
from recsys.module import CTRModule


class DCNModule(CTRModule):
    """DLRM with a low-rank cross network (Wang et al., DCN-V2, WWW 2021) as interaction.

    The cross net acts on the concatenation of the dense arch's output and every pooled
    embedding ((F + 1) x embedding_dim wide); the over arch reads the crossed vector.

    Args:
        dcn_num_layers: cross layers.
        dcn_low_rank_dim: rank r of each layer's W V factorization.
        **kwargs: CTRModule's (embedding_dim, dense_hidden, over_hidden, optimizers, ...).
    """

    def __init__(self, dcn_num_layers: int = 2, dcn_low_rank_dim: int = 8, **kwargs) -> None:
        if dcn_num_layers < 1 or dcn_low_rank_dim < 1:
            raise ValueError("model.dcn_num_layers and model.dcn_low_rank_dim must be >= 1")
        # set before the base constructor, which builds the network when given `features`
        self.dcn_num_layers = dcn_num_layers
        self.dcn_low_rank_dim = dcn_low_rank_dim
        super().__init__(**kwargs)

    def build_network(self, features: FeatureSpec) -> nn.Module:
        """DLRM_DCN for these features (the base class builds the plain DLRM)."""
        return DLRM_DCN(
            embedding_bag_collection=build_embedding_bags(
                features.sparse, features.cardinalities, self.embedding_dim),
            dense_in_features=max(len(features.dense), 1),
            dense_arch_layer_sizes=[*self.dense_hidden, self.embedding_dim],
            over_arch_layer_sizes=[*self.over_hidden, 1],
            dcn_num_layers=self.dcn_num_layers,
            dcn_low_rank_dim=self.dcn_low_rank_dim,
        )
