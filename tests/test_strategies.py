"""Every strategy on a tiny case computed by hand: two clients, two dense parameters, and a
table of three rows where row 0 is touched by the first client only and row 1 by nobody."""

from __future__ import annotations

import math

import pytest
import torch

from fltoolkit.strategies import (
    AggregationError,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    QFedAvg,
    ServerModel,
)
from fltoolkit.training.updates import ClientUpdate, SparseRows


def _updates() -> list[ClientUpdate]:
    first = ClientUpdate(client=0, num_samples=1, loss=0.5, dense=torch.tensor([1.0, 2.0]),
                         tables={"t": SparseRows(torch.tensor([0, 2]),
                                                 torch.tensor([[0.4], [1.0]]))})
    second = ClientUpdate(client=1, num_samples=3, loss=2.0, dense=torch.tensor([3.0, -2.0]),
                          tables={"t": SparseRows(torch.tensor([2]), torch.tensor([[-1.0]]))})
    return [first, second]


def _server() -> ServerModel:
    return ServerModel(dense=torch.zeros(2), tables={"t": torch.zeros(3, 1)})


def _rows(server: ServerModel) -> list[float]:
    return server.tables["t"].flatten().tolist()


def test_fedavg_weights_by_samples_and_averages_rows_over_touching_clients():
    server = _server()
    FedAvg().aggregate(_updates(), server)
    # dense: (1*[1,2] + 3*[3,-2]) / 4; row 0: client 0 alone; row 2: (1*1 + 3*(-1)) / 4
    assert server.dense.tolist() == [2.5, -1.0]
    assert _rows(server) == pytest.approx([0.4, 0.0, -0.5])


def test_fedavg_global_weighting_drags_rows_toward_zero():
    server = _server()
    FedAvg(sparse_weighting="global").aggregate(_updates(), server)
    assert _rows(server) == pytest.approx([0.1, 0.0, -0.5])  # row 0: 1 * 0.4 / 4


def test_fedavg_unweighted_and_server_lr():
    server = _server()
    FedAvg(weighted=False, server_lr=0.5).aggregate(_updates(), server)
    assert server.dense.tolist() == [1.0, 0.0]  # 0.5 * ([1,2] + [3,-2]) / 2
    assert _rows(server) == pytest.approx([0.2, 0.0, 0.0])


def _adaptive(v: float, eta: float, beta_1: float, tau: float, delta: float) -> float:
    return eta * (1 - beta_1) * delta / (math.sqrt(v) + tau)


@pytest.mark.parametrize(("strategy", "second_moment"), [
    (FedAdam(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
     lambda d: 0.99 * 1e-6 + 0.01 * d * d),
    (FedYogi(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
     lambda d: 1e-6 - 0.01 * d * d * math.copysign(1.0, 1e-6 - d * d)),
    (FedAdagrad(server_lr=0.1, beta_1=0.9, tau=1e-3), lambda d: 1e-6 + d * d),
])
def test_adaptive_server_optimizers_first_round(strategy, second_moment):
    server = _server()
    strategy.aggregate(_updates(), server)
    # mean deltas as in FedAvg: dense [2.5, -1.0], rows 0 and 2: 0.4 and -0.5; m starts at 0,
    # v at tau^2
    for got, delta in zip(server.dense.tolist() + _rows(server), [2.5, -1.0, 0.4, None, -0.5],
                          strict=True):
        expected = 0.0 if delta is None else _adaptive(second_moment(delta), 0.1, 0.9, 1e-3,
                                                       delta)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    moments = strategy.moments["t"]
    assert moments["m"][1].item() == 0.0 and moments["v"][1].item() == pytest.approx(1e-6)


def test_fedyogi_second_moment_differs_from_adam_once_v_exceeds_the_square():
    adam, yogi = FedAdam(server_lr=0.1), FedYogi(server_lr=0.1)
    small = [ClientUpdate(0, 1, 1.0, torch.tensor([1.0, 1.0]))]
    tiny = [ClientUpdate(0, 1, 1.0, torch.tensor([0.01, 0.01]))]
    for strategy in (adam, yogi):
        server = ServerModel(torch.zeros(2), {})
        strategy.aggregate(small, server)
        strategy.aggregate(tiny, server)
    # round 2, v1 = ~0.01 > d^2 = 1e-4: Adam v = .99 v1 + .01 d^2 (decays toward d^2);
    # Yogi v = v1 - .01 d^2 sign(v1 - d^2) = v1 - .01 d^2 (moves by a step of .01 d^2 only)
    v1 = 0.99 * 1e-6 + 0.01
    assert adam.moments["dense"]["v"][0].item() == pytest.approx(0.99 * v1 + 0.01 * 1e-4)
    v1_yogi = 1e-6 + 0.01
    assert yogi.moments["dense"]["v"][0].item() == pytest.approx(v1_yogi - 0.01 * 1e-4)


def test_fedavgm_accumulates_server_momentum():
    server = _server()
    strategy = FedAvgM(server_lr=1.0, momentum=0.5)
    strategy.aggregate(_updates(), server)
    assert server.dense.tolist() == [2.5, -1.0]  # m = delta
    strategy.aggregate(_updates(), server)
    assert server.dense.tolist() == [2.5 * 2.5, -2.5]  # w += 0.5 * delta + delta
    assert _rows(server) == pytest.approx([0.4 * 2.5, 0.0, -0.5 * 2.5])


def test_qfedavg_hand_case():
    server = _server()
    QFedAvg(q=1.0, client_lr=0.5).aggregate(_updates(), server)
    # L = 2; |delta_0|^2 = 1 + 4 + .16 + 1 = 6.16, |delta_1|^2 = 9 + 4 + 1 = 14
    # h = [1 * 4 * 6.16 + 2 * .5, 4 * 14 + 2 * 2] = [25.64, 60]
    # w = (F_0 L delta_0 + F_1 L delta_1) / sum(h) = (delta_0 + 4 delta_1) / 85.64
    assert server.dense.tolist() == pytest.approx([13 / 85.64, -6 / 85.64])
    assert _rows(server) == pytest.approx([0.4 / 85.64, 0.0, -3 / 85.64])


def test_qfedavg_with_q_zero_is_the_plain_mean():
    server = _server()
    QFedAvg(q=0.0, client_lr=0.5).aggregate(_updates(), server)
    assert server.dense.tolist() == pytest.approx([2.0, 0.0])


def test_fedprox_is_fedavg_on_the_server_and_a_client_setting():
    from fltoolkit.run.config import FederatedConfig

    server = _server()
    FedAvg().aggregate(_updates(), server)
    assert FederatedConfig(proximal_mu=0.1).proximal_mu == 0.1
    assert server.dense.tolist() == [2.5, -1.0]
    with pytest.raises(ValueError, match="federated.proximal_mu must be >= 0"):
        FederatedConfig(proximal_mu=-0.1)


def test_norm_clipping_wraps_a_server_optimizer():
    """Clipping is not tied to FedAvg: around FedAdam the clipped mean delta feeds Adam.
    Client 0 (norm sqrt(1 + 4 + .16 + 1) = 2.48) passes a bound of 3; client 1 (norm
    sqrt(9 + 4 + 1) = 3.74) is scaled by 3 / sqrt(14)."""
    from fltoolkit.strategies import NormClipping

    clipped = NormClipping(FedAdam(server_lr=0.1), max_norm=3.0)
    plain = FedAdam(server_lr=0.1)
    by_hand = [u.scaled(3 / math.sqrt(14)) if u.client == 1 else u for u in _updates()]
    server, expected = _server(), _server()
    clipped.aggregate(_updates(), server)
    plain.aggregate(by_hand, expected)
    assert server.dense.tolist() == pytest.approx(expected.dense.tolist())
    assert clipped.state_dict()["moments"]["dense"]["m"].tolist() == pytest.approx(
        plain.moments["dense"]["m"].tolist())
    assert clipped.name == "NormClipping(FedAdam)"
    assert clipped.hyperparameters()["strategy.server_lr"] == 0.1


def test_mismatched_shapes_raise_a_named_error():
    bad = ClientUpdate(client=7, num_samples=1, loss=1.0, dense=torch.zeros(3))
    with pytest.raises(AggregationError, match="client 7: dense delta of shape"):
        FedAvg().aggregate([bad], _server())
    with pytest.raises(AggregationError, match="no client updates"):
        FedAvg().aggregate([], _server())


def test_row_sums_of_several_tables_at_once_by_hand():
    """Two tables of one width summed together must not mix rows with equal ids, and a row
    id beyond its table is refused rather than landing in the next table."""
    from fltoolkit.strategies.base import AggregationError, weighted_row_sums

    tables = {"a": torch.zeros(3, 1), "b": torch.zeros(2, 1), "wide": torch.zeros(2, 2)}
    one = ClientUpdate(client=0, num_samples=1, loss=0.0, dense=torch.zeros(1), tables={
        "a": SparseRows(torch.tensor([0, 2]), torch.tensor([[1.0], [2.0]])),
        "b": SparseRows(torch.tensor([0]), torch.tensor([[10.0]]))})
    other = ClientUpdate(client=1, num_samples=3, loss=0.0, dense=torch.zeros(1), tables={
        "a": SparseRows(torch.tensor([2]), torch.tensor([[6.0]])),
        "wide": SparseRows(torch.tensor([1]), torch.tensor([[1.0, 2.0]]))})
    sums = weighted_row_sums([one, other], torch.tensor([1.0, 3.0]), tables)
    assert sums["a"].ids.tolist() == [0, 2]
    assert sums["a"].values.tolist() == [[1.0], [1 * 2.0 + 3 * 6.0]]
    assert sums["a"].weights.tolist() == [1.0, 4.0]
    assert sums["b"].ids.tolist() == [0] and sums["b"].values.tolist() == [[10.0]]
    assert sums["b"].weights.tolist() == [1.0]
    assert sums["wide"].values.tolist() == [[3.0, 6.0]] and sums["wide"].weights.tolist() == [3.0]
    beyond = ClientUpdate(client=2, num_samples=1, loss=0.0, dense=torch.zeros(1), tables={
        "a": SparseRows(torch.tensor([3]), torch.tensor([[1.0]]))})  # row 0 of "b" if offset
    with pytest.raises(AggregationError, match="row ids outside"):
        weighted_row_sums([beyond], torch.tensor([1.0]), tables)


def test_row_sums_over_the_round_layout_equal_those_over_plain_updates(synthetic_data):
    """The trainer's updates read one whole-round layout (ClientRows over RoundRows), which
    FedAvg reduces in a few ops per table: the same sums, bit for bit, as over the same
    updates as plain dicts, for the whole round and for a subset (rejected clients)."""
    from dataclasses import replace

    from fltoolkit.strategies.base import weighted_row_sums
    from fltoolkit.training.updates import ClientRows, shared_round, table_ids
    from tests.test_federated import _loop

    loop = _loop(synthetic_data, rounds=1)
    cohort = loop.planner.plan_round(1, loop.selector.select(1, 20).tolist())
    updates = loop.trainer.train_round(cohort)
    assert all(isinstance(u.tables, ClientRows) for u in updates)
    tables = {name: part.weight for name, part in loop.parts.tables.items()}
    for chosen in (updates, updates[1::3]):
        assert shared_round(chosen) is not None
        plain = [replace(u, tables=dict(u.tables.items())) for u in chosen]
        assert shared_round(plain) is None
        weights = torch.rand(len(chosen))
        fast = weighted_row_sums(chosen, weights, tables)
        slow = weighted_row_sums(plain, weights, tables)
        assert fast.keys() == slow.keys()
        for name, summed in slow.items():
            for got, expected in zip(fast[name], summed, strict=True):
                assert torch.equal(got, expected)
            assert torch.equal(table_ids(chosen, name), table_ids(plain, name))
        assert [u.upload_bytes() for u in chosen] == [u.upload_bytes() for u in plain]
