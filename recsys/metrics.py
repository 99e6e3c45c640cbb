"""CTR metrics: AUC, logloss, normalized entropy, calibration and GAUC.

All take logits (the model's raw outputs) and 0/1 labels over a whole evaluation set: AUC
is computed over the pooled predictions, never averaged over batches or clients. AUC is
torchmetrics' exact BinaryAUROC; NE and GAUC are ours and pinned by tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc


def auc(scores: Tensor, labels: Tensor) -> float:
    """Exact ROC AUC (ties count one half). Any monotone score works: logits or probabilities."""
    return float(binary_auroc(scores.float(), labels.long(), thresholds=None))


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
    """(group ids, rows per group, AUC per group: NaN without both a click and a non-click).

    Vectorised: one lexsort, average ranks of ties within a group, and the rank-sum
    (Mann-Whitney) form of AUC per group.
    """
    s = scores.detach().double().numpy()
    y = labels.detach().double().numpy()
    g = groups.detach().numpy()
    order = np.lexsort((s, g))
    s, y, g = s[order], y[order], g[order]
    n = len(s)
    if n == 0:
        return g, np.zeros(0), np.zeros(0)
    position = np.arange(n)
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_start = position[new_tie]
    tie_end = np.r_[tie_start[1:], n]
    tie_of_row = np.cumsum(new_tie) - 1
    group_start = np.maximum.accumulate(np.where(new_group, position, 0))
    rank_in_group = (tie_start + tie_end + 1) / 2.0  # 1-based average rank of each tie run
    rank_in_group = rank_in_group[tie_of_row] - group_start
    group_of_row = np.cumsum(new_group) - 1
    positives = np.bincount(group_of_row, weights=y)
    sizes = np.bincount(group_of_row).astype(np.float64)
    negatives = sizes - positives
    positive_rank_sum = np.bincount(group_of_row, weights=rank_in_group * y)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_group = (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    per_group[(positives == 0) | (negatives == 0)] = np.nan
    return g[new_group], sizes, per_group


def ctr_metrics(logits: Tensor, labels: Tensor, groups: Tensor | None = None) -> dict[str, float]:
    """Every metric fltk reports, over one pooled evaluation set."""
    logits = logits.detach().float().reshape(-1)
    labels = labels.detach().float().reshape(-1)
    one_class = bool(labels.min() == labels.max()) if labels.numel() else True
    return {
        "auc": math.nan if one_class else auc(logits, labels),
        "logloss": logloss(logits, labels),
        "ne": normalized_entropy(logits, labels),
        "gauc": gauc(logits, labels, groups) if groups is not None else math.nan,
        "calibration": calibration(logits, labels),
    }
