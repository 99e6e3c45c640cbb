"""Metrics against hand computations and brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from recsys.metrics import (
    auc,
    calibration,
    ctr_metrics,
    gauc,
    group_auc,
    logloss,
    normalized_entropy,
)


def brute_force_auc(scores: list[float], labels: list[int]) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_hand_case():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75


def test_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (60,), generator=g)
    expected = brute_force_auc(scores.tolist(), labels.tolist())
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-6)


def test_logloss_and_ne_by_hand():
    # logit 0 is p = 0.5 for every row: loss ln 2 whatever the labels
    logits, labels = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert logloss(logits, labels) == pytest.approx(math.log(2))
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(logits, labels) == pytest.approx(math.log(2) / base)
    # predicting the observed rate everywhere is exactly NE = 1
    rate_logit = torch.full((4,), math.log(0.25 / 0.75))
    assert normalized_entropy(rate_logit, labels) == pytest.approx(1.0, abs=1e-6)


def test_calibration_is_mean_prediction_over_observed_rate():
    logits = torch.tensor([0.0, 0.0, math.log(3.0), math.log(3.0)])  # p = .5, .5, .75, .75
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert calibration(logits, labels) == pytest.approx(0.625 / 0.25)


def test_gauc_hand_case_weights_users_by_impressions_and_skips_one_class_users():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.7, 0.6])
    labels = torch.tensor([1, 0, 0, 1, 0, 1, 1])
    groups = torch.tensor([7, 7, 3, 3, 3, 9, 9])
    # user 7: AUC 1 (2 rows); user 3: positive 0.2 beats neither 0.5 nor 0.3 -> 0 (3 rows);
    # user 9 has clicks only and does not count.
    assert gauc(scores, labels, groups) == pytest.approx((1.0 * 2 + 0.0 * 3) / 5)
    ids, sizes, per_user = group_auc(scores, labels, groups)
    assert ids.tolist() == [3, 7, 9] and sizes.tolist() == [3, 2, 2]
    np.testing.assert_allclose(per_user, [0.0, 1.0, np.nan])


def test_gauc_matches_per_user_brute_force():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (300,), generator=g).float()
    labels = torch.randint(0, 2, (300,), generator=g)
    groups = torch.randint(0, 25, (300,), generator=g)
    num, den = 0.0, 0
    for user in groups.unique().tolist():
        mask = groups == user
        if labels[mask].min() == labels[mask].max():
            continue
        num += brute_force_auc(scores[mask].tolist(), labels[mask].tolist()) * int(mask.sum())
        den += int(mask.sum())
    assert gauc(scores, labels, groups) == pytest.approx(num / den, abs=1e-9)


def test_ctr_metrics_reports_every_metric():
    logits = torch.tensor([-2.0, 1.0, 0.5, -1.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    metrics = ctr_metrics(logits, labels, torch.tensor([0, 0, 1, 1]))
    assert set(metrics) == {"auc", "logloss", "ne", "gauc", "calibration"}
    assert metrics["auc"] == 0.75 and metrics["gauc"] == 0.5


def test_auc_is_exact_for_confident_logits():
    # a float32 sigmoid rounds both 17 and 20 to 1.0 and ties them: 0.75 instead of 1
    assert auc(torch.tensor([-1.0, 17.0, 20.0]), torch.tensor([0.0, 0.0, 1.0])) == 1.0


def test_auc_matches_pairwise_count_on_wide_logits_with_ties():
    g = torch.Generator().manual_seed(5)
    logits = torch.rand(400, generator=g, dtype=torch.float64) * 80 - 40  # -40 .. 40
    logits[::7] = logits[3]  # deliberate ties, positives against negatives too
    logits[1::11] = 38.5
    labels = torch.randint(0, 2, (400,), generator=g)
    expected = brute_force_auc(logits.tolist(), labels.tolist())
    assert auc(logits, labels) == pytest.approx(expected, abs=1e-12)
    assert auc(logits.float(), labels) == pytest.approx(
        brute_force_auc(logits.float().tolist(), labels.tolist()), abs=1e-12)


def test_auc_is_gauc_of_a_single_group():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(300, generator=g) * 20
    labels = torch.randint(0, 2, (300,), generator=g)
    assert auc(logits, labels) == gauc(logits, labels, torch.zeros(300, dtype=torch.int64))
