"""Asynchronous runs (federated.mode async, FedBuff): they learn, each update trains from the
version the timeline says and reaches the strategy times its staleness weight, refusals are
one line, a resumed run is the uninterrupted one, and both trainers and selectors run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltoolkit.asynchronous import StalenessWeight
from fltoolkit.loop import LoopHooks
from fltoolkit.reports.staleness import parse_staleness_counts
from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.systems.config import SystemsConfig
from fltoolkit.systems.devices import Availability
from tests.test_federated import _loop
from tests.test_resume import assert_resumes_as_whole, stopped_and_resumed

ADAM_ADAGRAD = (lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: torch.optim.Adagrad(p, lr=0.1))


def _async_loop(data, **kwargs):
    settings = {"mode": "async", "rounds": 8, "eval_interval": 4, "clients_per_round": 20,
                "systems": SystemsConfig(enabled=True), **kwargs}
    return _loop(data, **settings)


def _rows(loop) -> list[dict]:
    rows: list[dict] = []
    loop.hooks = LoopHooks(on_round=rows.append)
    return rows


def test_an_async_run_learns_and_reports_each_aggregation(synthetic_data):
    loop = _async_loop(synthetic_data)
    before = {k: v.detach().clone() for k, v in loop.module.state_dict().items()}
    rows = _rows(loop)
    final = loop.run()
    assert final["auc"] > 0.57
    assert any(not torch.equal(v, before[k]) for k, v in loop.module.state_dict().items())
    assert len(rows) == 8 and all(row["aggregated"] == 10 for row in rows)  # buffer: 20 // 2
    assert rows[0]["selected"] > 20  # the first 20, and replacements until the buffer filled
    assert max(row["max_staleness"] for row in rows) > 0
    assert {"mean_staleness", "dropped_stale", "sim_time_s", "round_duration_s"} <= set(rows[0])
    for row in rows:  # the counts by staleness are the buffer the mean and the max describe
        counts = parse_staleness_counts(row["staleness_counts"])
        assert sum(counts.values()) == 10 and max(counts) == row["max_staleness"]
        assert sum(s * n for s, n in counts.items()) / 10 == pytest.approx(row["mean_staleness"])
    clock = [row["sim_time_s"] for row in rows]
    assert clock == sorted(clock) and final["sim_time_s"] == clock[-1]


def test_each_update_trains_from_its_start_version_and_reaches_the_strategy_weighted(
        synthetic_data):
    """The spied trainer's update of every buffered client, times w(s), is what the strategy
    aggregates; it was trained at the aggregation of its start version, with that version's
    plan (the seeds that priced its run time)."""
    staleness = StalenessWeight("polynomial", exponent=1.0)
    loop = _async_loop(synthetic_data, rounds=5, staleness=staleness)
    timeline = loop.asynchronous.timeline
    trained: dict[tuple[int, int], torch.Tensor] = {}  # (client, version) -> its dense delta
    planned: list[tuple[int, list[int]]] = []
    plan_round, train_round = loop.planner.plan_round, loop.trainer.train_round

    def spy_plan(version, clients):
        planned.append((version, list(clients)))
        return plan_round(version, clients)

    def spy_train(cohort):
        updates = train_round(cohort)
        version, clients = planned[-1]
        assert clients == cohort.clients and version == timeline.version - 1
        trained.update({(u.client, version): u.dense.clone() for u in updates})
        return updates

    aggregated: list[list] = []
    aggregate = loop.strategy.aggregate
    loop.planner.plan_round, loop.trainer.train_round = spy_plan, spy_train
    loop.strategy.aggregate = lambda updates, server: (aggregated.append(updates),
                                                       aggregate(updates, server))
    buffers = []
    advance = timeline.advance
    timeline.advance = lambda: buffers.append(advance()) or buffers[-1]
    loop.run()
    assert len(aggregated) == 5 and any(a.staleness > 0 for b in buffers for a in b.buffered)
    for buffer, updates in zip(buffers, aggregated, strict=True):
        assert [u.client for u in updates] == [a.client for a in buffer.buffered]
        for update, arrival in zip(updates, buffer.buffered, strict=True):
            assert arrival.weight == staleness(arrival.staleness)
            expected = trained[(arrival.client, arrival.start_version)] * arrival.weight
            torch.testing.assert_close(update.dense, expected)


def test_async_refusals_are_one_line_naming_the_keys(synthetic_data):
    from fltoolkit.privacy.config import PrivacyConfig

    with pytest.raises(ConfigError, match="systems.enabled true") as refused:
        _loop(synthetic_data, mode="async")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="privacy section"):
        _async_loop(synthetic_data, privacy=PrivacyConfig(noise_multiplier=1.0))
    config = FederatedConfig(mode="async", sharding="table_wise")
    with pytest.raises(ConfigError, match="federated.sharding table_wise"):
        config.check_mode(devices=True, privacy=False)
    with pytest.raises(ValueError, match="federated.buffer_size: asynchronous settings"):
        FederatedConfig(buffer_size=4)
    policy = FederatedConfig(mode="async", clients_per_round=9).async_policy()
    assert (policy.concurrency, policy.buffer_size, policy.max_staleness) == (9, 4, None)


def test_an_async_run_resumes_exactly_with_updates_in_flight(synthetic_data, tmp_path):
    """2 aggregations, checkpoint, 2 more in a fresh loop == 4 at once: with updates and
    held client state (local rows, Adam/Adagrad moments) in flight, Oort and FedYogi."""
    from fltoolkit.selection import Oort
    from fltoolkit.strategies import FedYogi

    def build():
        return _async_loop(synthetic_data, rounds=4, eval_interval=2, local_tables=["user"],
                           keep_optimizer_state=True, strategy=FedYogi(server_lr=0.01),
                           selector=Oort(), optimizers=ADAM_ADAGRAD, max_staleness=2)

    whole = build()
    expected = whole.run()
    first, second = stopped_and_resumed(build, tmp_path)
    assert first.asynchronous.updates and first.asynchronous.states  # in flight at the stop
    assert any(state.local_rows for state in first.asynchronous.states.values())
    assert sorted(second.asynchronous.updates) == sorted(first.asynchronous.updates)
    assert_resumes_as_whole(second, whole, expected)


def test_the_vectorized_and_sequential_trainers_give_the_same_async_run(synthetic_data):
    sequential = _async_loop(synthetic_data, vectorize=False).run()
    together = _async_loop(synthetic_data, vectorize=True).run()
    assert together["sim_time_s"] == sequential["sim_time_s"]  # the same timeline
    assert together["auc"] == pytest.approx(sequential["auc"], abs=0.003)


@pytest.mark.parametrize("selector", ["uniform", "oort"])
def test_uniform_and_oort_selection_run_async(synthetic_data, selector):
    from fltoolkit.selection import Oort, UniformSelector

    loop = _async_loop(synthetic_data, rounds=6, concurrency=12, buffer_size=5,
                       selector=Oort() if selector == "oort" else UniformSelector())
    rows = _rows(loop)
    loop.run()
    assert [row["aggregated"] for row in rows] == [5] * 6
    assert int((loop.participation > 0).sum()) > 12


def test_session_end_is_the_end_of_the_interval_online_at_sees():
    # client 0 online [10, 20) and [30, 40); client 1 never; period 100
    availability = Availability(np.array([0, 2, 2]), np.array([10.0, 30.0]),
                                np.array([20.0, 40.0]), period_s=100.0)
    ends = availability.session_end(np.array([0, 0, 0, 0, 1]), 115.0)
    assert ends.tolist() == [120.0] * 4 + [115.0]
    for t in (5.0, 10.0, 19.5, 20.0, 35.0, 140.0):
        online = availability.online_at(2, t)
        assert online.tolist() == [bool(availability.session_end([0], t)[0] > t), False]
    assert availability.online_at(2, 10.0)[0] and not availability.online_at(2, 20.0)[0]
