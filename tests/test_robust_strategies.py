"""Robust strategies on small cases computed by hand, then on a cohort with two attackers."""

from __future__ import annotations

import math

import pytest
import torch

from fltoolkit.strategies import (
    AggregationError,
    CoordinateMedian,
    FedAvg,
    NormClipping,
    ServerModel,
    TrimmedMean,
)
from fltoolkit.training.updates import ClientUpdate, SparseRows


def _update(client: int, dense: list[float], rows: dict[int, list[float]] | None = None,
            num_samples: int = 1) -> ClientUpdate:
    """A client's update with table "t" holding `rows` (row id -> delta)."""
    tables = {}
    if rows is not None:
        ids = sorted(rows)
        tables["t"] = SparseRows(torch.tensor(ids, dtype=torch.int64),
                                 torch.tensor([rows[i] for i in ids]).reshape(len(ids), -1))
    return ClientUpdate(client=client, num_samples=num_samples, loss=1.0,
                        dense=torch.tensor(dense), tables=tables)


def _server(dense_size: int, rows: int, width: int) -> ServerModel:
    return ServerModel(dense=torch.zeros(dense_size), tables={"t": torch.zeros(rows, width)})


def test_median_per_coordinate_and_over_the_clients_that_touched_each_row():
    updates = [
        _update(0, [1.0, 5.0], {0: [1.0, 4.0], 2: [5.0, 0.0]}, num_samples=100),
        _update(1, [3.0, -1.0], {1: [0.5, -0.5], 2: [-1.0, 7.0]}),
        _update(2, [10.0, 2.0], {0: [3.0, -2.0], 2: [2.0, 3.0]}),
    ]
    server = _server(2, 4, 2)
    CoordinateMedian().aggregate(updates, server)
    # dense: median(1, 3, 10), median(5, -1, 2); client 0's 100 samples buy it no extra vote
    assert server.dense.tolist() == [3.0, 2.0]
    assert server.tables["t"].tolist() == [
        [2.0, 1.0],    # clients 0 and 2 only: mean of the two middle values, (1+3)/2, (4-2)/2
        [0.5, -0.5],   # client 1 alone
        [2.0, 3.0],    # all three: median(5, -1, 2), median(0, 7, 3)
        [0.0, 0.0],    # nobody
    ]


def test_median_of_an_even_count_is_the_mean_of_the_middle_values_times_server_lr():
    server = _server(2, 1, 1)
    CoordinateMedian(server_lr=0.5).aggregate([_update(0, [1.0, 2.0]), _update(1, [3.0, -2.0]),
                                              _update(2, [0.0, 8.0]), _update(3, [9.0, 0.0])],
                                             server)
    # sorted (0, 1, 3, 9) and (-2, 0, 2, 8): (1+3)/2 = 2 and (0+2)/2 = 1, halved
    assert server.dense.tolist() == [1.0, 0.5]
    assert server.tables["t"].tolist() == [[0.0]]


def test_trimmed_mean_drops_one_value_per_side_of_five():
    updates = [
        _update(0, [100.0, 1.0], {0: [10.0], 1: [4.0]}),
        _update(1, [2.0, -50.0], {0: [-10.0], 1: [8.0]}),
        _update(2, [1.0, 3.0], {0: [1.0]}),
        _update(3, [4.0, 0.0], {0: [2.0]}),
        _update(4, [3.0, 2.0], {0: [3.0]}),
    ]
    server = _server(2, 3, 1)
    TrimmedMean(beta=0.2).aggregate(updates, server)
    # ceil(0.2 * 5) = 1: mean(2, 3, 4) and mean(0, 1, 2)
    assert server.dense.tolist() == pytest.approx([3.0, 1.0])
    # row 0, five clients: mean(1, 2, 3); row 1, two clients: min(ceil(0.4), 0) = 0, their mean
    assert server.tables["t"].flatten().tolist() == pytest.approx([2.0, 6.0, 0.0])


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_beta_outside_zero_to_half(beta):
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(beta=beta)


def test_trimmed_mean_with_beta_zero_is_the_unweighted_mean():
    server = _server(1, 1, 1)
    TrimmedMean(beta=0.0, server_lr=2.0).aggregate(
        [_update(0, [1.0], {0: [1.0]}, num_samples=9), _update(1, [4.0], {0: [2.0]})], server)
    assert server.dense.tolist() == [5.0]
    assert server.tables["t"].tolist() == [[3.0]]


def test_norm_clipping_scales_only_updates_above_the_bound():
    large = _update(0, [6.0, 0.0], {1: [0.0, 8.0]}, num_samples=1)  # norm 10 over dense and rows
    small = _update(1, [0.3, 0.4], num_samples=3)  # norm 0.5
    server = _server(2, 2, 2)
    NormClipping(FedAvg(), max_norm=1.0).aggregate([large, small], server)
    # large becomes [0.6, 0] and row [0, 0.8]; dense (1 * [0.6, 0] + 3 * [0.3, 0.4]) / 4
    assert server.dense.tolist() == pytest.approx([0.375, 0.3])
    assert server.tables["t"].flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.8])
    assert large.dense.tolist() == [6.0, 0.0]  # the client's update itself is not modified


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_norm_clipping_rejects_a_non_positive_bound(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        NormClipping(FedAvg(), max_norm=max_norm)


def test_hyperparameters_and_summary():
    assert TrimmedMean(beta=0.2).hyperparameters() == {"beta": 0.2, "server_lr": 1.0}
    assert CoordinateMedian().summary() == "CoordinateMedian\n  server_lr: 1.0"
    clipped = NormClipping(FedAvg(weighted=False), max_norm=2.0)
    assert clipped.hyperparameters() == {"max_norm": 2.0, "strategy": "FedAvg",
                                         "strategy.server_lr": 1.0,
                                         "strategy.sparse_weighting": "touched",
                                         "strategy.weighted": False}
    assert "max_norm: 2.0" in clipped.summary()


def test_robust_strategies_check_shapes():
    with pytest.raises(AggregationError, match="client 0: dense delta of shape"):
        CoordinateMedian().aggregate([_update(0, [1.0])], _server(2, 1, 1))


def _flat(update: ClientUpdate) -> torch.Tensor:
    """The dense delta followed by the delta of row 0 (every client here sends only that row)."""
    return torch.cat([update.dense, update.tables["t"].values[0]])


def test_two_attackers_out_of_twelve():
    generator = torch.Generator().manual_seed(0)
    size, width = 50, 4

    def honest(client: int) -> ClientUpdate:
        delta = 1 + torch.randn(size + width, generator=generator) * 0.1
        return _update(client, delta[:size].tolist(), {0: delta[size:].tolist()})

    def malicious(update: ClientUpdate) -> ClientUpdate:
        rows = update.tables["t"]
        return ClientUpdate(update.client, update.num_samples, update.loss, update.dense * -100,
                            {"t": SparseRows(rows.ids, rows.values * -100)})

    cohort = [honest(k) for k in range(10)]
    updates = cohort + [malicious(honest(k)) for k in (10, 11)]

    def aggregated(strategy) -> torch.Tensor:
        server = _server(size, 1, width)
        strategy.aggregate(updates, server)
        return torch.cat([server.dense, server.tables["t"][0]])

    assert (aggregated(FedAvg()) - 1).abs().min() > 10  # about (10 - 200) / 12 = -16
    for robust in (CoordinateMedian(), TrimmedMean(beta=0.2)):
        assert (aggregated(robust) - 1).abs().max() < 0.2
    # mean = (sum honest + sum clipped attackers) / 12, so its distance to the honest mean is
    # at most 2/12 * (max_norm + |honest mean|), whatever the attackers send
    honest_mean = torch.stack([_flat(u) for u in cohort]).mean(0)
    max_norm = 1.1 * max(float(_flat(u).norm()) for u in cohort)  # honest updates pass as is
    shift = aggregated(NormClipping(FedAvg(), max_norm=max_norm)) - honest_mean
    assert float(shift.norm()) <= 2 / 12 * (max_norm + float(honest_mean.norm())) + 1e-4


@pytest.mark.parametrize("strategy", [CoordinateMedian(), TrimmedMean(beta=0.25)])
def test_vectorized_rows_match_a_row_by_row_reference(strategy):
    generator = torch.Generator().manual_seed(1)
    rows, width = 12, 3
    updates = []
    for client in range(7):
        ids = torch.nonzero(torch.rand(rows, generator=generator) < 0.6).flatten()
        values = torch.randn(ids.numel(), width, generator=generator)
        updates.append(ClientUpdate(client, 1, 1.0, torch.zeros(1), {"t": SparseRows(ids, values)}))
    server = _server(1, rows, width)
    strategy.aggregate(updates, server)
    for row in range(rows):
        sent = [u.tables["t"].values[u.tables["t"].ids == row] for u in updates]
        column = torch.cat(sent).sort(dim=0).values
        n = column.shape[0]
        if n == 0:
            expected = torch.zeros(width)
        elif isinstance(strategy, CoordinateMedian):
            expected = (column[(n - 1) // 2] + column[n // 2]) / 2
        else:
            trim = min(math.ceil(0.25 * n), (n - 1) // 2)
            expected = column[trim:n - trim].mean(0)
        torch.testing.assert_close(server.tables["t"][row], expected)


def test_trimmed_mean_trims_a_row_three_clients_touched():
    # ceil(0.2 * 3) = 1 per side: the malicious -10x value goes, the middle one stays
    updates = [_update(0, [0.0], {0: [1.0]}), _update(1, [0.0], {0: [-10.0]}),
               _update(2, [0.0], {0: [2.0]})]
    server = _server(1, 1, 1)
    TrimmedMean(beta=0.2).aggregate(updates, server)
    assert server.tables["t"].flatten().tolist() == [1.0]
