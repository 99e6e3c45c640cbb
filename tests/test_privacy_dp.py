"""DP-FedAvg by hand: clipping, the fixed denominator, the noise over untouched rows and
adaptive clipping's quantile update."""

from __future__ import annotations

import math

import pytest
import torch

from fltoolkit.privacy.dp import DifferentialPrivacy
from fltoolkit.strategies import CoordinateMedian, FedAdam, FedAvg, ServerModel
from fltoolkit.training.updates import ClientUpdate, SparseRows


def _updates() -> list[ClientUpdate]:
    """Client 0: norm sqrt(9 + 16) = 5; client 1: norm sqrt(0.09 + 0.16) = 0.5."""
    first = ClientUpdate(client=0, num_samples=10, loss=0.5, dense=torch.tensor([3.0, 0.0]),
                         tables={"t": SparseRows(torch.tensor([2]), torch.tensor([[4.0]]))})
    second = ClientUpdate(client=1, num_samples=1, loss=0.5, dense=torch.tensor([0.3, 0.4]),
                          tables={"t": SparseRows(torch.tensor([0]), torch.tensor([[0.0]]))})
    return [first, second]


def _server(rows: int = 4) -> ServerModel:
    return ServerModel(dense=torch.zeros(2), tables={"t": torch.zeros(rows, 1)})


def _quiet(**kwargs) -> DifferentialPrivacy:
    """DP with noise too small to see: the arithmetic around the noise, by hand."""
    settings = {"noise_multiplier": 1e-9, "clip_norm": 1.0, "expected_clients": 4.0, **kwargs}
    dp = DifferentialPrivacy(FedAvg(), **settings)
    dp.start_round(1, [0, 1], seed=0)
    return dp


def test_clipping_bounds_each_whole_update_and_leaves_small_ones_alone():
    contributions = _quiet().contributions(_updates())
    assert [c.scale for c in contributions] == pytest.approx([1 / 5, 1.0])
    assert [c.weight for c in contributions] == [1.0, 1.0]
    assert [c.extras["unclipped"] for c in contributions] == [0.0, 1.0]
    clipped_norm = contributions[0].scale * contributions[0].update.norm()
    assert clipped_norm == pytest.approx(1.0)


def test_the_mean_divides_by_the_expected_cohort_not_by_the_clients_or_samples():
    """(clip(u0) + u1) / 4 with unit weights, whatever the samples (10 and 1) and although
    only two clients came: dense (0.6 + 0.3, 0 + 0.4) / 4; row 2: 0.8 / 4; row 0: 0."""
    server = _server()
    _quiet().aggregate(_updates(), server)
    assert server.dense.tolist() == pytest.approx([0.9 / 4, 0.4 / 4], abs=1e-6)
    assert server.tables["t"].flatten().tolist() == pytest.approx([0, 0, 0.2, 0], abs=1e-6)


def test_rows_can_have_their_own_fixed_denominator():
    """row_denominator 1: the rows' sums undivided (row 2: 0.8), the dense mean still / 4."""
    server = _server()
    _quiet(row_denominator=1.0).aggregate(_updates(), server)
    assert server.dense.tolist() == pytest.approx([0.9 / 4, 0.4 / 4], abs=1e-6)
    assert server.tables["t"].flatten().tolist() == pytest.approx([0, 0, 0.8, 0], abs=1e-6)


def test_noise_covers_every_row_of_a_million_row_table_with_the_stated_std():
    """No client touched the table: every row still moves, by noise of std z C / m."""
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.5, clip_norm=2.0, expected_clients=5)
    dp.start_round(3, [0], seed=7)
    server = ServerModel(dense=torch.zeros(2), tables={"big": torch.zeros(1_000_000, 4)})
    only_dense = ClientUpdate(client=0, num_samples=1, loss=0.0, dense=torch.zeros(2))
    dp.aggregate([only_dense], server)
    moved = server.tables["big"]
    assert bool((moved != 0).all())
    expected_std = 1.5 * 2.0 / 5  # 0.6
    # 4M draws: the sample std's relative standard error is 1/sqrt(2 * 4M) = 0.035%
    assert float(moved.std()) == pytest.approx(expected_std, rel=0.002)
    assert abs(float(moved.mean())) < 5 * expected_std / math.sqrt(moved.numel())


def test_same_round_same_noise_and_another_round_other_noise():
    def noised(round_index: int) -> torch.Tensor:
        dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0,
                                 expected_clients=2)
        dp.start_round(round_index, [0, 1], seed=0)
        server = _server()
        dp.aggregate(_updates(), server)
        return server.tables["t"]

    assert torch.equal(noised(1), noised(1))
    assert not torch.equal(noised(1), noised(2))


def test_adaptive_clipping_quantile_update_by_hand():
    """C' = C exp(-eta (b - gamma)), b = (unclipped + sigma_b * n) / m with n the generator's
    next normal: 1 of 2 clients under C = 1, m = 4, gamma = 0.3, eta = 0.2, sigma_b = 0.1."""
    dp = _quiet(target_quantile=0.3, count_noise=0.1)
    dp._adapt_clip_norm(1.0, torch.Generator().manual_seed(5))
    n = float(torch.randn((), generator=torch.Generator().manual_seed(5)))
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * ((1 + 0.1 * n) / 4 - 0.3)))
    assert dp.state_dict()["clip_norm"] == dp.clip_norm


def test_adaptive_clipping_settles_at_the_target_quantile_of_the_norms():
    """Nine clients with update norms 1..9 every round: C tends to their median, 5."""
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1e-3, clip_norm=0.5,
                             expected_clients=9, target_quantile=0.5, clip_learning_rate=0.2,
                             count_noise=0.1)
    updates = [ClientUpdate(client=k, num_samples=1, loss=0.0, dense=torch.tensor([k + 1.0]))
               for k in range(9)]
    for round_index in range(300):
        dp.start_round(round_index, list(range(9)), seed=0)
        dp.aggregate(updates, ServerModel(dense=torch.zeros(1), tables={}))
    assert 4.0 <= dp.clip_norm <= 6.0


def test_the_updates_share_the_budget_with_the_noised_count():
    """(z^-2 - (2 sigma_b)^-2)^-1/2 with z = 1, sigma_b = 1: (1 - 1/4)^-1/2."""
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=20,
                             target_quantile=0.5, count_noise=1.0)
    assert dp.update_noise_multiplier() == pytest.approx(1 / math.sqrt(0.75))
    assert DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0,
                               expected_clients=20).update_noise_multiplier() == 1.0
    with pytest.raises(ValueError, match="count_noise .* must exceed noise_multiplier / 2"):
        DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=20,
                            target_quantile=0.5, count_noise=0.4)


def test_wraps_server_optimizers_and_refuses_what_needs_individual_updates():
    dp = DifferentialPrivacy(FedAdam(server_lr=0.1), noise_multiplier=1e-9, clip_norm=1.0,
                             expected_clients=4)
    dp.start_round(1, [0, 1], seed=0)
    dp.aggregate(_updates(), _server())
    assert dp.name == "DifferentialPrivacy(FedAdam)"
    assert "m" in dp.state_dict()["strategy"]["moments"]["t"]
    with pytest.raises(ValueError, match="needs an averaging strategy .* not CoordinateMedian"):
        DifferentialPrivacy(CoordinateMedian(), noise_multiplier=1.0, clip_norm=1.0,
                            expected_clients=4)
