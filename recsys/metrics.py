"""CTR metrics: AUC, logloss, normalized entropy, calibration and GAUC.

All take logits (the model's raw outputs) and 0/1 labels over a whole evaluation set: AUC
is computed over the pooled predictions, never averaged over batches or clients. AUC and GAUC
rank the raw scores in float64 through one rank-sum implementation (datamodules.rank_auc), so
they rank the same values; all metrics are pinned by tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules import rank_auc


def auc(scores: Tensor, labels: Tensor) -> float:
    """Exact ROC AUC (ties count one half). Any monotone score works: logits or probabilities."""
    return rank_auc.auc(_float64(scores), _float64(labels))


def logloss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy, computed from logits for numerical stability."""
    return float(F.binary_cross_entropy_with_logits(logits.float(), labels.float()))


def normalized_entropy(logits: Tensor, labels: Tensor) -> float:
    """Logloss divided by the entropy of the empirical click rate (He et al., ADKDD 2014).

    Below 1 means the model beats always predicting the average CTR of this set.
    """
    rate = float(labels.float().mean())
    if rate in (0.0, 1.0):
        return math.nan
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return logloss(logits, labels) / base


def calibration(logits: Tensor, labels: Tensor) -> float:
    """Mean predicted CTR over observed CTR (1.0 is calibrated)."""
    observed = float(labels.float().mean())
    return float(torch.sigmoid(logits.float()).mean()) / observed if observed > 0 else math.nan


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Group AUC: per-user AUC weighted by the user's impressions (Zhou et al., DIN, KDD 2018).

    Only users with both a click and a non-click count.
    """
    _, sizes, per_group = group_auc(scores, labels, groups)
    valid = ~np.isnan(per_group)
    if not valid.any():
        return math.nan
    return float((per_group[valid] * sizes[valid]).sum() / sizes[valid].sum())


def group_auc(scores: Tensor, labels: Tensor, groups: Tensor
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, rows per group, AUC per group: NaN without both a click and a non-click)."""
    return rank_auc.group_auc(_float64(scores), _float64(labels), groups.detach().numpy())


def _float64(values: Tensor) -> np.ndarray:
    """A tensor as a float64 array: exact for any float32 score, so ranks are not changed."""
    return values.detach().double().numpy()


def ctr_metrics(logits: Tensor, labels: Tensor, groups: Tensor | None = None) -> dict[str, float]:
    """Every metric fltk reports, over one pooled evaluation set."""
    logits = logits.detach().reshape(-1)  # each metric picks its precision: AUCs rank float64
    labels = labels.detach().float().reshape(-1)
    one_class = bool(labels.min() == labels.max()) if labels.numel() else True
    return {
        "auc": math.nan if one_class else auc(logits, labels),
        "logloss": logloss(logits, labels),
        "ne": normalized_entropy(logits, labels),
        "gauc": gauc(logits, labels, groups) if groups is not None else math.nan,
        "calibration": calibration(logits, labels),
    }
