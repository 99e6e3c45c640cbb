"""Partitioners: sizes, label skew, determinism, the ClientTable they build and their summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.clients import (
    Partitioner,
    by_key,
    describe,
    dirichlet,
    iid,
    power_law,
    power_law_sizes,
    to_client_table,
)

LABELS = (np.random.default_rng(0).random(20_000) < 0.5).astype(np.float32)


def _sizes(client_of_row: np.ndarray, num_clients: int) -> np.ndarray:
    return np.bincount(client_of_row, minlength=num_clients)


def test_iid_deals_every_row_once_in_near_equal_seeded_shares():
    client_of_row = iid(1_003, 10, seed=1)
    assert client_of_row.dtype == np.int64 and client_of_row.shape == (1_003,)
    sizes = _sizes(client_of_row, 10)
    assert sizes.sum() == 1_003 and sizes.max() - sizes.min() <= 1
    assert np.array_equal(client_of_row, iid(1_003, 10, seed=1))
    assert not np.array_equal(client_of_row, iid(1_003, 10, seed=2))


def test_dirichlet_small_alpha_skews_label_mixes():
    client_of_row = dirichlet(LABELS, 20, alpha=0.05, seed=0)
    facts = describe(client_of_row, 20, LABELS)
    # Measured over seeds 0-4: click-rate std 0.42-0.47, median majority share >= 0.9995.
    assert facts["client_positive_rate_std"] > 0.3
    assert facts["majority_share_median"] > 0.95
    assert client_of_row.min() >= 0 and client_of_row.max() < 20
    assert np.array_equal(client_of_row, dirichlet(LABELS, 20, alpha=0.05, seed=0))


def test_dirichlet_large_alpha_is_near_iid():
    facts = describe(dirichlet(LABELS, 20, alpha=1000.0, seed=0), 20, LABELS)
    # Measured over seeds 0-4: largest total variation from the global mix 0.013-0.031.
    assert facts["empty_clients"] == 0
    assert facts["label_tv_max"] < 0.05
    assert abs(facts["client_positive_rate_mean"] - facts["positive_rate"]) < 0.01


def test_by_key_gives_one_client_per_distinct_key_in_key_order():
    keys = np.array([30, 10, 30, 20, 10, 30])
    client_of_row = by_key(keys)
    assert client_of_row.tolist() == [2, 0, 2, 1, 0, 2]
    assert np.unique(client_of_row).shape[0] == np.unique(keys).shape[0]
    assert by_key(np.array(["b", "a", "b"])).tolist() == [1, 0, 1]


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_power_law_sizes_follow_rank_to_the_minus_exponent(exponent):
    client_of_row = power_law(10_000, 100, exponent, seed=0, min_size=2)
    sizes = np.sort(_sizes(client_of_row, 100))[::-1]
    assert sizes.sum() == 10_000 and sizes.min() >= 2
    # With exponent 2 the tail is raised to min_size; the head keeps its slope.
    assert sizes[0] / sizes[9] == pytest.approx(10**exponent, rel=0.05)
    assert np.array_equal(client_of_row, power_law(10_000, 100, exponent, seed=0, min_size=2))


def test_power_law_exponent_zero_gives_equal_sizes():
    sizes = power_law_sizes(1_003, 10, exponent=0.0)
    assert sizes.sum() == 1_003 and sizes.max() - sizes.min() <= 1


def test_power_law_rejects_too_few_rows_for_min_size():
    with pytest.raises(ValueError, match="num_rows"):
        power_law_sizes(10, 4, exponent=1.0, min_size=3)


def test_to_client_table_sorts_rows_stably_and_drops_empty_clients():
    client_of_row = np.array([2, 0, 2, 3, 0, 2])  # client 1 has no rows
    label = torch.arange(6, dtype=torch.float32)
    table = to_client_table(label[:, None] * 10, torch.arange(6)[:, None], label, client_of_row)
    assert table.offsets.tolist() == [0, 2, 5, 6]
    assert table.client_ids.tolist() == [0, 2, 3]
    assert table.label.tolist() == [1.0, 4.0, 0.0, 2.0, 5.0, 3.0]
    assert table.sparse[:, 0].tolist() == [1, 4, 0, 2, 5, 3]
    assert table.dense[:, 0].tolist() == [10.0, 40.0, 0.0, 20.0, 50.0, 30.0]


def test_gini_of_equal_sizes_is_zero_and_of_1_1_4_is_one_third():
    assert describe(np.repeat(np.arange(4), 5), 4)["size_gini"] == 0.0
    # Mean absolute difference over all 9 ordered pairs: (3 + 3 + 3 + 3) / 9 = 4/3;
    # divided by twice the mean size (2 * 2): 1/3.
    assert describe(np.array([0, 1, 2, 2, 2, 2]), 3)["size_gini"] == pytest.approx(1 / 3)


def test_describe_counts_empty_clients_and_label_figures():
    facts = describe(np.array([0, 0, 2, 2]), 3, labels=np.array([1.0, 0.0, 1.0, 1.0]))
    assert facts["empty_clients"] == 1 and facts["size_min"] == 0 and facts["size_max"] == 2
    assert facts["positive_rate"] == 0.75
    assert facts["client_positive_rate_mean"] == pytest.approx(0.75)  # clients 0 and 2 only
    assert facts["label_tv_max"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="client_of_row"):
        describe(np.array([0, 3]), 3)


def test_partitioner_dispatches_with_its_arguments():
    assert np.array_equal(Partitioner("iid", num_clients=7, seed=3)(LABELS), iid(20_000, 7, 3))
    assert np.array_equal(Partitioner("dirichlet", num_clients=5, alpha=0.3, seed=1)(LABELS),
                          dirichlet(LABELS, 5, 0.3, 1))
    assert np.array_equal(Partitioner("power_law", num_clients=9, exponent=1.5)(LABELS),
                          power_law(20_000, 9, 1.5, 0))
    keys = np.arange(20_000) % 13
    assert np.array_equal(Partitioner("key")(LABELS, keys), by_key(keys))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "dirichlet", "num_clients": 4, "alpha": 0.0}, "alpha"),
        ({"kind": "power_law", "num_clients": 4, "exponent": -1.0}, "exponent"),
        ({"kind": "iid", "num_clients": 0}, "num_clients"),
        ({"kind": "iid"}, "num_clients"),
        ({"kind": "key", "num_clients": 4}, "num_clients"),
        ({"kind": "zipf", "num_clients": 4}, "kind"),
    ],
)
def test_partitioner_rejects_bad_arguments_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Partitioner(**kwargs)


def test_partitioner_key_needs_one_key_per_row():
    with pytest.raises(ValueError, match="keys"):
        Partitioner("key")(LABELS)
