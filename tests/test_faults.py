"""Faulty clients: injected faults are seeded and hit their fraction, NaN updates are rejected
without hurting the run, norm outliers are rejected, and robust strategies resist 20% of
clients sending -10x updates where FedAvg breaks."""

from __future__ import annotations

import pytest
import torch

from fltoolkit.gate.faults import Faults, norm_outliers
from fltoolkit.strategies import CoordinateMedian, TrimmedMean
from fltoolkit.training.updates import ClientUpdate, SparseRows
from tests.test_federated import _loop

SETTINGS = {"rounds": 6, "clients_per_round": 40, "eval_interval": 3, "local_epochs": 3}


def _update(client: int, dense: list[float], rows: list[float] | None = None) -> ClientUpdate:
    tables = {} if rows is None else {"t": SparseRows(torch.tensor([0]), torch.tensor([rows]))}
    return ClientUpdate(client=client, num_samples=1, loss=0.1, dense=torch.tensor(dense),
                        tables=tables)


def test_faults_are_seeded_per_client_and_round_and_hit_their_fraction():
    faults = Faults(crash=0.1, nan=0.2, scale=0.3, scale_factor=-10.0)
    outcomes = [faults.inject(_update(c, [1.0, 2.0], [3.0]), seed=0, round_index=1)
                for c in range(5000)]
    crashed = sum(o is None for o in outcomes) / 5000
    nan = sum(o is not None and not o.is_finite() for o in outcomes) / 5000
    scaled = [o for o in outcomes if o is not None and o.is_finite() and o.dense[0] == -10.0]
    assert crashed == pytest.approx(0.1, abs=0.015) and nan == pytest.approx(0.2, abs=0.02)
    assert len(scaled) / 5000 == pytest.approx(0.3, abs=0.02)
    assert scaled[0].dense.tolist() == [-10.0, -20.0]
    assert scaled[0].tables["t"].values.tolist() == [[-30.0]]
    again = faults.inject(_update(7, [1.0, 2.0]), seed=0, round_index=1)
    first = outcomes[7]
    assert (again is None) == (first is None) and (again is None or torch.equal(
        again.dense.nan_to_num(), first.dense.nan_to_num()))
    with pytest.raises(ValueError, match="crash \\+ nan \\+ scale"):
        Faults(crash=0.5, nan=0.6)


def test_norm_outliers_are_judged_against_the_round_median():
    # norms 1, 2, 5 (3-4-5 over dense and row) and 100: median (lower) 2, bound 3 x 2 = 6
    updates = [_update(0, [1.0]), _update(1, [2.0]), _update(2, [3.0], [4.0]),
               _update(3, [100.0])]
    assert norm_outliers(updates, ratio=3.0).tolist() == [False, False, False, True]


@pytest.fixture(scope="module")
def clean_auc(synthetic_data) -> float:
    return _loop(synthetic_data, **SETTINGS).run()["auc"]


def test_nan_clients_are_rejected_and_leave_the_auc_within_0_01(synthetic_data, clean_auc):
    row = _loop(synthetic_data, faults=Faults(nan=0.2), **SETTINGS).run()
    assert 0.15 * 240 < row["rejected_total"] < 0.25 * 240  # 6 rounds x 40 clients
    assert abs(row["auc"] - clean_auc) < 0.01


def test_robust_strategies_resist_scaled_clients_where_fedavg_degrades(synthetic_data,
                                                                       clean_auc):
    attack = Faults(scale=0.2, scale_factor=-10.0)
    try:
        fedavg = _loop(synthetic_data, faults=attack, **SETTINGS).run()["auc"]
    except FloatingPointError:  # diverged to non-finite outputs: the run stops, no better
        fedavg = 0.5            # than chance
    assert fedavg < clean_auc - 0.05
    for strategy in (CoordinateMedian(), TrimmedMean(beta=0.2)):
        robust = _loop(synthetic_data, faults=attack, strategy=strategy, **SETTINGS).run()
        assert robust["auc"] > clean_auc - 0.02, strategy.name
    # rejecting norm outliers rescues plain FedAvg too
    guarded = _loop(synthetic_data, faults=attack, reject_norm_ratio=3.0, **SETTINGS).run()
    assert guarded["rejected_total"] > 0 and guarded["auc"] > clean_auc - 0.02


@pytest.mark.parametrize("every_row", [False, True])
def test_a_round_whose_aggregate_is_not_finite_is_discarded(synthetic_data, caplog, every_row):
    """A diverging server step is undone: in the touched rows, or in every row for a
    strategy that moves untouched ones too (DP's noise)."""
    from fltoolkit.privacy.config import PrivacyConfig

    loop = _loop(synthetic_data, rounds=1,
                 privacy=PrivacyConfig(noise_multiplier=1.0) if every_row else None)
    before = {k: v.detach().clone() for k, v in loop.module.state_dict().items()}

    def explode(updates, server):  # a diverging server step: NaN dense, Inf in touched rows
        server.dense.fill_(float("nan"))
        for name, rows in updates[0].tables.items():
            server.tables[name][rows.ids] = float("inf")
        if every_row:
            for table in server.tables.values():
                table[-1] += 1.0  # a row no update touched

    loop.strategy.aggregate = explode
    stats = loop.run_round(1)
    assert stats.skipped == 1 and "was discarded" in caplog.text
    for key, value in loop.module.state_dict().items():
        assert torch.equal(value, before[key]), key
