"""Exact ROC AUC from ranks (the Mann-Whitney form), over all rows or per group.

Why it lives in datamodules, the bottom layer: the datamodules score baselines themselves (the
Taobao popularity baseline, the synthetic data's oracle AUC) and must not import recsys, which
is built on them; recsys.metrics reports AUC and GAUC through this same code, so a model's AUC,
its GAUC and the baselines it is read against are one statistic.

Scores are ranked as float64, as given: no sigmoid (any monotone score ranks alike, and a
float32 sigmoid ties every logit above ~16.6 at 1.0). Tied scores share their average rank, so
a tied positive/negative pair counts one half.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """AUC of all rows (labels 0/1); NaN without both a positive and a negative."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    _, _, per_group = group_auc(scores, labels, np.zeros(scores.shape[0], dtype=np.int64))
    return float(per_group[0]) if per_group.shape[0] else math.nan


def group_auc(scores: npt.ArrayLike, labels: npt.ArrayLike, groups: npt.ArrayLike
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, rows per group, AUC per group: NaN without both a positive and a negative).

    Vectorised: one lexsort, average ranks of ties within a group, and the rank sum of the
    positives per group.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
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
