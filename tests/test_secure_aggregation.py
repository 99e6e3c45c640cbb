"""Secure aggregation around averaging strategies: the same model as the plain sum (within
the ring's quantization error), with and without dropouts, and a server side that receives
masked vectors only."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from fltoolkit.privacy.dp import DifferentialPrivacy
from fltoolkit.privacy.secure_aggregation import SecureAggregation
from fltoolkit.privacy.secure_sum import SecureAggregationFailed, upload_bytes
from fltoolkit.strategies import CoordinateMedian, FedAdam, FedAvg, ServerModel
from fltoolkit.strategies.sums import SumStrategy, UpdateSum
from fltoolkit.training.updates import ClientUpdate, SparseRows


def _updates(clients: int = 4) -> list[ClientUpdate]:
    """Clients with 1..4 samples, small deltas (norms < 1) over two tables."""
    generator = torch.Generator().manual_seed(0)
    updates = []
    for k in range(clients):
        rows = torch.tensor(sorted({k % 3, (k + 2) % 5}))
        updates.append(ClientUpdate(
            client=10 + k, num_samples=k + 1, loss=0.1,
            dense=0.1 * torch.randn(3, generator=generator),
            tables={"a": SparseRows(rows, 0.1 * torch.randn(len(rows), 2, generator=generator)),
                    **({"b": SparseRows(torch.tensor([k]), torch.full((1, 1), 0.05 * k))}
                       if k % 2 else {})}))
    return updates


def _server() -> ServerModel:
    return ServerModel(dense=torch.zeros(3), tables={"a": torch.zeros(5, 2),
                                                     "b": torch.zeros(4, 1)})


def _run(strategy, updates, cohort) -> ServerModel:
    server = _server()
    strategy.start_round(1, cohort, seed=3)
    strategy.aggregate(updates, server)
    return server


def _assert_close(got: ServerModel, expected: ServerModel, tol: float = 1e-6) -> None:
    assert torch.allclose(got.dense, expected.dense, atol=tol)
    for name, table in expected.tables.items():
        assert torch.allclose(got.tables[name], table, atol=tol), name


@pytest.mark.parametrize("inner", [FedAvg, lambda: FedAdam(server_lr=0.1)])
def test_the_model_equals_the_plain_aggregate_within_quantization(inner):
    updates = _updates()
    cohort = [u.client for u in updates]
    secure = _run(SecureAggregation(inner(), clip_norm=10.0), updates, cohort)
    _assert_close(secure, _run(inner(), updates, cohort))
    assert secure.tables["a"].abs().sum() > 0 and secure.tables["b"][1].abs().sum() > 0


def test_dropped_clients_masks_are_removed_and_the_survivors_sum_remains():
    updates = _updates(5)
    cohort = [u.client for u in updates]
    survivors = [updates[0], updates[2], updates[3]]
    secure = _run(SecureAggregation(FedAvg(), clip_norm=10.0, min_survivors=0.6), survivors,
                  cohort)
    _assert_close(secure, _run(FedAvg(), survivors, cohort))


def test_too_few_survivors_fail_the_round_and_leave_the_model():
    updates = _updates(5)
    secure = SecureAggregation(FedAvg(), clip_norm=10.0, min_survivors=0.6)
    secure.start_round(1, [u.client for u in updates], seed=3)
    server = _server()
    with pytest.raises(SecureAggregationFailed, match="2 of 5 clients survived"):
        secure.aggregate(updates[:2], server)
    assert server.dense.abs().sum() == 0


def test_updates_are_clipped_to_the_bound_before_the_ring():
    """Client 0's update scaled to norm 0.05 before the sample-weighted mean."""
    updates = _updates(3)
    bound = 0.05
    clipped = [u.scaled(bound / u.norm()) if u.norm() > bound else u for u in updates]
    cohort = [u.client for u in updates]
    secure = _run(SecureAggregation(FedAvg(), clip_norm=bound), updates, cohort)
    _assert_close(secure, _run(FedAvg(), clipped, cohort))


def test_around_dp_it_gives_the_noised_model_of_dp_alone():
    updates = _updates()
    cohort = [u.client for u in updates]

    def dp() -> DifferentialPrivacy:
        return DifferentialPrivacy(FedAvg(), noise_multiplier=0.7, clip_norm=0.2,
                                   expected_clients=4, target_quantile=0.5, count_noise=1.0)

    secure = SecureAggregation(dp(), clip_norm=1.0)
    alone = dp()
    _assert_close(_run(secure, updates, cohort), _run(alone, updates, cohort), tol=1e-5)
    assert secure.strategy.clip_norm == pytest.approx(alone.clip_norm)  # the noised count too


class _Recorder(SumStrategy):
    """An inner strategy that keeps what it is given."""

    name = "recorder"

    def __init__(self) -> None:
        self.sums: list[UpdateSum] = []

    def contributions(self, updates):
        return FedAvg().contributions(updates)

    def apply_sum(self, total: UpdateSum, server: ServerModel) -> None:
        self.sums.append(total)


def test_what_crosses_to_the_server_is_masked_vectors_and_the_inner_strategy_gets_a_sum(
        monkeypatch):
    """Everything the server side receives: one int64 ring vector per client that looks
    uniform although the client's deltas are all zero; the inner strategy gets one UpdateSum
    (never an update), whose weight is the samples' sum."""
    from dataclasses import replace

    received = {}
    original = SecureAggregation.server_sum

    def spy(self, uploads, protocol, ring, layout, device):
        received.update(uploads)
        return original(self, uploads, protocol, ring, layout, device)

    monkeypatch.setattr(SecureAggregation, "server_sum", spy)
    recorder = _Recorder()
    updates = [replace(u, dense=torch.zeros(4000)) for u in _updates()]
    server = ServerModel(torch.zeros(4000), _server().tables)
    secure = SecureAggregation(recorder, clip_norm=10.0)
    secure.start_round(1, [u.client for u in updates], seed=3)
    secure.aggregate(updates, server)
    assert sorted(received) == [u.client for u in updates]
    for vector in received.values():
        assert vector.dtype == torch.int64 and int(vector.min()) >= 0
        assert int(vector.max()) < 2 ** 32
        # the top 4 bits of a masked vector are uniform over 16 buckets
        counts = torch.bincount(vector >> 28, minlength=16).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3
    assert len(recorder.sums) == 1 and isinstance(recorder.sums[0], UpdateSum)
    assert recorder.sums[0].clients == 4
    assert recorder.sums[0].weight == pytest.approx(1 + 2 + 3 + 4, abs=1e-6)


def test_upload_bytes_count_the_masked_vector_and_the_protocol():
    """Dense 3 + weight 1 + table a: 5 union rows x (2 + 1) + table b: 2 rows x (1 + 1)."""
    updates = _updates()
    secure = SecureAggregation(FedAvg(), clip_norm=1.0, bits=32)
    secure.start_round(1, [u.client for u in updates], seed=0)
    sent = secure.uploads(updates)
    coordinates = 3 + 1 + 5 * 3 + 2 * 2
    assert sent.bytes == 4 * upload_bytes(coordinates, neighbours=3, bits=32)
    assert sent.rows == 5 + 2


def test_refuses_strategies_that_need_individual_updates():
    with pytest.raises(ValueError, match="needs an averaging strategy .* not CoordinateMedian"):
        SecureAggregation(CoordinateMedian(), clip_norm=1.0)
