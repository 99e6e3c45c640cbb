"""CTRModule: a DLRM click model as a LightningModule (logits out, BCE-with-logits loss).

The module knows nothing of federation: fltk's federated loop drives the same
`training_step` and `configure_optimizers` that a Lightning Trainer drives centrally, so a
subclass with its own model or loss federates unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from datamodules.base import FeatureSpec
from datamodules.clients import Batch
from recsys.dlrm import SingleIdFeatures, build_dlrm, dense_input
from recsys.metrics import ctr_metrics
from recsys.optim import DenseSparseOptimizer
from recsys.parts import dense_parameters, embedding_tables


class CTRModule(L.LightningModule):
    """DLRM for click-through rate prediction.

    Args:
        embedding_dim: width of every embedding table (and of the dense arch's output).
        dense_hidden: hidden layer sizes of the dense (bottom) MLP; `embedding_dim` is appended.
        over_hidden: hidden layer sizes of the over (top) MLP; a 1-unit logit layer is appended.
        dense_optimizer: optimizer of the MLP parameters; default Adam(lr=1e-3).
        sparse_optimizer: optimizer of the embedding tables, which get sparse gradients, so it
            must accept them (SGD, Adagrad without weight decay, SparseAdam); default
            Adagrad(lr=0.05).
        embedding_l2: L2 penalty on the embeddings a batch looks up (mean over rows of the
            squared norms). Id tables of users and ads memorize quickly; this keeps rows that
            are seen a few times near zero, and it touches only the rows in the batch, so the
            table gradients stay sparse.
        prior_bias: start the output bias at the logit of the training click rate (from the
            feature spec) instead of 0. It helps adaptive server optimizers (FedAdam, FedYogi),
            whose steps are about `eta` per round, too small to move a bias quickly to -3
            (default FL schedule, FedAdam: AUC 0.770 with, 0.753 without). With plain SGD it
            slowed the start (10k rows, 2 epochs: AUC 0.51 instead of above 0.6).
        features: the feature spec; usually unset and taken from the datamodule at fit time.
    """

    def __init__(
        self,
        embedding_dim: int = 16,
        dense_hidden: list[int] | None = None,
        over_hidden: list[int] | None = None,
        dense_optimizer: OptimizerCallable | None = None,
        sparse_optimizer: OptimizerCallable | None = None,
        embedding_l2: float = 0.0,
        prior_bias: bool = False,
        features: FeatureSpec | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"model.embedding_dim must be >= 1, got {embedding_dim}")
        if embedding_l2 < 0:
            raise ValueError(f"model.embedding_l2 must be >= 0, got {embedding_l2}")
        self.embedding_dim = embedding_dim
        self.embedding_l2 = embedding_l2
        self.prior_bias = prior_bias
        self.dense_hidden = [64] if dense_hidden is None else list(dense_hidden)
        self.over_hidden = [128, 64] if over_hidden is None else list(over_hidden)
        self.dense_optimizer = dense_optimizer or (lambda p: torch.optim.Adam(p, lr=1e-3))
        self.sparse_optimizer = sparse_optimizer or (lambda p: torch.optim.Adagrad(p, lr=0.05))
        self.features: FeatureSpec | None = None
        self.model: nn.Module | None = None
        self._eval_outputs: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self.last_metrics: dict[str, float] = {}
        if features is not None:
            self.configure_features(features)

    def configure_features(self, features: FeatureSpec) -> None:
        """Build the network for these features (vocabulary sizes come from the data prep)."""
        if self.features is not None:
            if self.features != features:
                raise ValueError("CTRModule was built for other features")
            return
        self.features = features
        self.to_kjt = SingleIdFeatures(features.sparse)
        self.model = self.build_network(features)
        if self.prior_bias and features.label_mean is not None:
            output = [m for m in self.model.over_arch.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                output.bias.fill_(math.log(features.label_mean / (1 - features.label_mean)))

    def build_network(self, features: FeatureSpec) -> nn.Module:
        """The network for these features: TorchRec's DLRM. Override it to plug in another
        architecture with the same arches (sparse, dense, interaction, over; e.g. DLRM_DCN):
        its tables must sit in an EmbeddingBagCollection named like the sparse features."""
        return build_dlrm(features.sparse, features.cardinalities, len(features.dense),
                          self.embedding_dim, self.dense_hidden, self.over_hidden)

    def configure_model(self) -> None:
        """Lightning hook: take the features from the trainer's datamodule if not built yet."""
        if self.model is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "feature_spec"):
                raise RuntimeError("CTRModule needs features: call configure_features(spec) "
                                   "or fit with a CTRDataModule")
            self.configure_features(datamodule.feature_spec)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """Logits [B] for dense [B, D] and sparse ids [B, F]."""
        return self.logits_and_embeddings(dense, sparse)[0]

    def logits_and_embeddings(self, dense: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B] and the pooled embeddings [B, F, E] they came from.

        TorchRec's DLRM arches called in DLRM.forward's order, keeping the embeddings at hand.
        """
        if self.model is None:
            raise RuntimeError("CTRModule has no network yet: call configure_features(spec)")
        dlrm = self.model
        embedded = dlrm.sparse_arch(self.to_kjt(sparse))
        interactions = dlrm.inter_arch(dense_features=dlrm.dense_arch(dense_input(dense)),
                                       sparse_features=embedded)
        return dlrm.over_arch(interactions).squeeze(-1), embedded

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels)

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """The loss to minimize, and each row's log loss (detached).

        Lightning only needs "loss"; "sample_losses" lets a federated selector such as Oort
        measure a client's statistical utility over every sample it trained on.
        """
        logits, embedded = self.logits_and_embeddings(batch.dense, batch.sparse)
        loss = self.loss(logits, batch.label)
        with torch.no_grad():
            sample_losses = F.binary_cross_entropy_with_logits(logits, batch.label,
                                                               reduction="none")
        if self.embedding_l2:
            loss = loss + self.embedding_l2 * embedded.square().sum(dim=(1, 2)).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch))
        return {"loss": loss, "sample_losses": sample_losses}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch.dense, batch.sparse)
        self._eval_outputs.append((logits, batch.label, batch.group))

    def on_validation_epoch_end(self) -> None:
        logits, labels, groups = zip(*self._eval_outputs, strict=True)
        self._eval_outputs.clear()
        group = None if groups[0] is None else torch.cat(groups)
        self.last_metrics = ctr_metrics(torch.cat(logits), torch.cat(labels), group)
        loggable = {k: v for k, v in self.last_metrics.items() if not math.isnan(v)}
        self.log_dict(loggable, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.model is None:
            raise RuntimeError("CTRModule has no network yet: call configure_features(spec)")
        tables = [weight for weight, _ in embedding_tables(self.model).values()]
        return DenseSparseOptimizer(self.dense_optimizer(dense_parameters(self.model)),
                                    self.sparse_optimizer(tables))
