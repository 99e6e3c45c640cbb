"""Device populations and the simulated clock, checked on hand-made cases."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from datamodules.clients import ClientTable
from fltoolkit.privacy.dp import DifferentialPrivacy
from fltoolkit.privacy.secure_aggregation import SecureAggregation
from fltoolkit.selection import UniformSelector
from fltoolkit.strategies import FedAvg, Strategy
from fltoolkit.systems.admission import DeviceAdmission
from fltoolkit.systems.clock import client_seconds
from fltoolkit.systems.config import SystemsConfig
from fltoolkit.systems.devices import (
    DeviceError,
    DevicePopulation,
    generate_devices,
    load_devices,
    load_fedscale,
    merge_intervals,
    save_devices,
)
from fltoolkit.systems.policy import RoundPolicy
from fltoolkit.training.cohort import CohortPlanner, LocalSchedule
from recsys.parts import TablePart


def _population() -> DevicePopulation:
    # client 0: online [0, 100) and [200, 300); client 1: [50, 60); period 400 s
    availability = merge_intervals(np.array([0, 0, 1, 0]), np.array([0.0, 200.0, 50.0, 20.0]),
                                   np.array([100.0, 300.0, 60.0, 90.0]), 2, period_s=400.0)
    return DevicePopulation(np.array([10.0, 100.0]), np.array([1000.0, 8.0]),
                            np.array([500.0, 4.0]), availability)


def test_clock_adds_download_compute_and_upload():
    # client 0: 125000 B down at 1000 kbit/s = 1 s; 30 samples x 10 ms = 0.3 s;
    #           62500 B up at 500 kbit/s = 1 s  -> 2.3 s
    # client 1: 1000 B at 8 kbit/s = 1 s; 2 x 100 ms = 0.2 s; 500 B at 4 kbit/s = 1 s -> 2.2 s
    seconds = client_seconds(_population(), np.array([0, 1]), np.array([125_000, 1_000]),
                             np.array([30, 2]), np.array([62_500, 500]))
    np.testing.assert_allclose(seconds, [2.3, 2.2])


def _three_clients(strategy: Strategy) -> CohortPlanner:
    """Clients 0, 1 and 2 train one epoch on their rows, which touch items {1, 2}, {2, 3}
    and {5} of an 8 x 2 table; the model has 3 dense weights."""
    data = ClientTable(dense=torch.zeros(5, 1), sparse=torch.tensor([[1], [2], [2], [3], [5]]),
                       label=torch.zeros(5), offsets=torch.tensor([0, 2, 4, 5]),
                       client_ids=torch.arange(3))
    table = TablePart(torch.nn.Parameter(torch.zeros(8, 2)), columns=[0], num_rows=8)
    return CohortPlanner(data, {"item": table}, LocalSchedule(batch_size=2, local_epochs=1),
                         ["item"], [torch.zeros(3)], seed=0,
                         uploads=strategy.planned_upload_bytes)


def _dp() -> DifferentialPrivacy:
    return DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=3)


# Every device: 1000 ms a sample, 8 kbit/s (1000 B/s) both ways. Client 0 trains 2 samples
# (2 s) and downloads 3 x 4 B dense + 2 rows x (8 B id + 2 x 4 B) = 44 B (0.044 s); client 1
# the same; client 2: 1 sample, 12 + 16 = 28 B. A plain update uploads what was downloaded.
# Secure aggregation: one vector over the union {1, 2, 3, 5}: 3 dense + 1 weight (+ 1 DP
# count) + 4 rows x (2 + 1 weight) = 16 (17) coordinates x 4 B = 64 (68) B, and the protocol
# with 2 neighbours: keys 2 x 32 + shares 2 x (2 x 32 + 36) + unmasking 3 x (4 + 32) = 372 B.
@pytest.mark.parametrize(("strategy", "uploaded"), [
    (FedAvg, [44, 44, 28]),
    (_dp, [44, 44, 28]),  # DP alone sends plain updates
    (lambda: SecureAggregation(FedAvg(), clip_norm=1.0), [436, 436, 436]),
    (lambda: SecureAggregation(_dp(), clip_norm=1.0), [440, 440, 440]),
], ids=["fedavg", "dp", "secure_aggregation", "secure_aggregation_dp"])
def test_the_clock_charges_what_the_strategys_protocol_uploads(tmp_path, strategy, uploaded):
    save_devices(DevicePopulation(np.full(3, 1000.0), np.full(3, 8.0), np.full(3, 8.0)),
                 tmp_path / "devices.parquet")
    admission = DeviceAdmission(3, SystemsConfig(enabled=True,
                                                 devices=str(tmp_path / "devices.parquet")), 0)
    selector = UniformSelector()
    selector.bind(3, seed=0)
    planner = _three_clients(strategy())
    admitted = admission.admit(1, 3, selector, planner.plan_round)
    assert admitted.cohort.upload_bytes.tolist() == uploaded
    expected = {0: 2.044 + uploaded[0] / 1000, 1: 2.044 + uploaded[1] / 1000,
                2: 1.028 + uploaded[2] / 1000}  # e.g. 2.044 + 0.436 = 2.48 s
    assert admitted.durations == pytest.approx(expected)
    assert admitted.seconds == admission.sim_time_s == pytest.approx(expected[0])


def test_clients_beyond_the_population_reuse_devices_cyclically():
    np.testing.assert_allclose(client_seconds(_population(), np.array([3]), np.array([0]),
                                              np.array([1]), np.array([0])), [0.1])


def test_overlapping_intervals_merge_and_a_session_must_cover_the_whole_round():
    availability = _population().availability
    assert availability.offsets.tolist() == [0, 2, 3]
    assert availability.start_s.tolist() == [0.0, 200.0, 50.0]
    assert availability.end_s.tolist() == [100.0, 300.0, 60.0]
    clients = np.array([0, 0, 0, 1, 1, 0])
    begin = np.array([10.0, 90.0, 250.0, 50.0, 55.0, 610.0])  # 610 s = 210 s of the 2nd period
    end = begin + np.array([50.0, 20.0, 50.0, 10.0, 10.0, 80.0])
    # [90, 110) leaves the session at 100; [55, 65) ends after client 1 goes offline at 60
    assert availability.online_throughout(clients, begin, end).tolist() == [
        True, False, True, True, False, True]


def test_generated_population_is_seeded_and_heavy_tailed():
    first, again = generate_devices(2000, seed=3), generate_devices(2000, seed=3)
    np.testing.assert_array_equal(first.compute_ms_per_sample, again.compute_ms_per_sample)
    p5, p95 = np.percentile(first.compute_ms_per_sample, [5, 95])
    assert p95 / p5 > 10
    online = first.availability.online_throughout(np.arange(2000), np.full(2000, 43_200.0),
                                                  np.full(2000, 43_260.0))
    assert 0.02 < online.mean() < 0.9  # some, not all, clients online at noon
    midnight = first.availability.online_at(2000, 0.0)
    assert 0.5 < midnight.mean() / online.mean() < 2  # sessions wrap: no dip after midnight


def test_our_parquet_format_round_trips(tmp_path):
    population = _population()
    save_devices(population, tmp_path / "devices.parquet")
    loaded = load_devices(tmp_path / "devices.parquet")
    np.testing.assert_array_equal(loaded.down_kbps, population.down_kbps)
    assert loaded.availability.period_s == 400.0
    np.testing.assert_array_equal(loaded.availability.end_s, population.availability.end_s)
    with pytest.raises(DeviceError, match="missing.parquet: file not found"):
        load_devices(tmp_path / "missing.parquet")


def test_fedscale_pickles_load_only_when_allowed(tmp_path):
    capacity = {7: {"computation": 20.0, "communication": 800.0},
                3: {"computation": 5.0, "communication": 100.0}}
    behave = {7: {"active": [0, 500], "inactive": [100, 600], "finish_time": 1000},
              3: {"active": [50], "inactive": [70], "finish_time": 1000}}
    (tmp_path / "capacity").write_bytes(pickle.dumps(capacity))
    (tmp_path / "behave").write_bytes(pickle.dumps(behave))
    with pytest.raises(DeviceError, match="allow_pickle"):
        load_fedscale(tmp_path / "capacity", tmp_path / "behave")
    population = load_fedscale(tmp_path / "capacity", tmp_path / "behave", allow_pickle=True)
    assert population.compute_ms_per_sample.tolist() == [5.0, 20.0]  # sorted by client id
    assert population.up_kbps.tolist() == population.down_kbps.tolist() == [100.0, 800.0]
    assert population.availability.period_s == 1000.0
    assert population.availability.online_throughout(
        np.array([1, 1, 0]), np.array([510.0, 1510.0, 60.0]),
        np.array([590.0, 1590.0, 80.0])).tolist() == [True, True, False]


def test_bad_device_values_are_rejected():
    with pytest.raises(DeviceError, match="down_kbps must be finite and > 0"):
        DevicePopulation(np.ones(2), np.array([1.0, 0.0]), np.ones(2))


def test_over_commitment_keeps_exactly_the_k_fastest():
    policy = RoundPolicy(over_commit=1.5)
    assert policy.num_selected(4) == 6
    seconds = np.array([5.0, 1.0, 9.0, 3.0, 2.0, 7.0])
    outcome = policy.admit(seconds, np.ones(6, dtype=bool), wanted=4)
    assert outcome.kept.tolist() == [0, 1, 3, 4]  # 1, 2, 3 and 5 s; positions in selection order
    assert outcome.stragglers.tolist() == [2, 5]
    assert outcome.duration_s == 5.0 and not outcome.skipped


def test_offline_and_late_clients_are_dropped_and_too_few_updates_skip_the_round():
    seconds = np.array([1.0, 2.0, 30.0, 4.0])
    online = np.array([True, False, True, True])
    outcome = RoundPolicy(deadline_s=10.0).admit(seconds, online, wanted=4)
    assert outcome.kept.tolist() == [0, 3] and outcome.duration_s == 4.0
    assert outcome.offline.tolist() == [1] and outcome.late.tolist() == [2]
    skipped = RoundPolicy(deadline_s=10.0, min_updates=3).admit(seconds, online, wanted=4)
    assert skipped.skipped and skipped.kept.size == 0 and skipped.duration_s == 10.0
    with pytest.raises(ValueError, match="over_commit must be >= 1"):
        RoundPolicy(over_commit=0.5)
