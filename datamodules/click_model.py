"""Math shared by the planted click models of the synthetic data sets (Taobao and Criteo).

Both generators draw per-value effects, fix their realised strength, and solve for the bias
that gives a target click rate; one implementation keeps the two planted models comparable.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """The logistic function, written so that large |x| neither overflows nor warns."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(x)))


def standardized(table: np.ndarray, codes: np.ndarray, scale: float) -> np.ndarray:
    """Per-value `table` shifted and scaled so that `table[codes]` has mean 0 and RMS norm `scale`.

    Fixes the realised strength of an effect drawn over few values (gender has two), so that
    seeds give comparable oracle AUCs.
    """
    values = table[codes]
    centered = table - values.mean(axis=0)
    rms = np.sqrt(np.mean(np.square(centered[codes]).reshape(len(codes), -1).sum(axis=1)))
    return centered * (scale / rms) if rms > 0 else centered


def solve_bias(score: np.ndarray, click_rate: float) -> float:
    """Bias giving the target mean click probability over the rows' scores (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2.0
        low, high = (mid, high) if sigmoid(mid + score).mean() < click_rate else (low, mid)
    return (low + high) / 2.0
