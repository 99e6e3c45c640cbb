"""Differential privacy and secure aggregation in whole runs: what crosses from the clients to
the server against what summary.json says it learns, the privacy budget, refused
combinations, the trainers, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from fltoolkit.privacy.config import PrivacyConfig
from fltoolkit.privacy.secure_aggregation import SecureAggregation
from fltoolkit.reports.config import ReportConfig
from fltoolkit.run.config import ConfigError
from fltoolkit.run.summary import summary
from fltoolkit.selection import Oort, PoissonSelector
from fltoolkit.strategies import CoordinateMedian
from fltoolkit.strategies.sums import UpdateSum
from fltoolkit.systems.config import SystemsConfig
from tests.test_federated import _loop
from tests.test_resume import assert_resumes_as_whole, stopped_and_resumed

DP = {"noise_multiplier": 0.8, "clip_norm": 0.5}


def test_without_secure_aggregation_the_server_receives_each_update_as_stated(synthetic_data):
    """Every update that reaches the gate (the server's door) is one client's: only the
    uploaded tables, never the local one, and the rows and bytes the statement counts."""
    loop = _loop(synthetic_data, rounds=2, local_tables=["user"], selector=PoissonSelector(),
                 privacy=PrivacyConfig(**DP))
    crossed = []
    screen = loop.gate.screen
    loop.gate.screen = lambda updates, r: (crossed.append(list(updates)), screen(updates, r))[1]
    loop.run()
    learns = loop.server_learns()
    assert learns["server_receives"] == "each client's update"
    assert learns["tables_local"] == ["user"] and "user" not in learns["tables_uploaded"]
    every = [u for round_updates in crossed for u in round_updates]
    assert every and all(set(u.tables) <= set(learns["tables_uploaded"]) for u in every)
    assert all("user" not in u.tables for u in every)
    assert learns["rows_received_per_round"] == sum(u.num_rows() for u in every) // 2
    assert learns["bytes_received_per_round"] == sum(u.upload_bytes() for u in every) // 2
    dp = learns["differential_privacy"]
    assert dp["guarantee_holds"] and dp["sampling"]["kind"] == "poisson"
    assert dp["epsilon"] == pytest.approx(loop.privacy.accountant.epsilon(2))


def test_with_secure_aggregation_the_server_side_gets_masked_vectors_and_one_sum(
        synthetic_data, monkeypatch):
    """The server side of each round receives one ring vector per arriving client and the
    strategy one UpdateSum; the bytes counted are the protocol's, not the updates'."""
    received, sums = [], []
    server_sum = SecureAggregation.server_sum

    def spy(self, uploads, *rest):
        received.append(uploads)
        total = server_sum(self, uploads, *rest)
        sums.append(total)
        return total

    monkeypatch.setattr(SecureAggregation, "server_sum", spy)
    loop = _loop(synthetic_data, rounds=2, local_tables=["user"],
                 privacy=PrivacyConfig(**DP, secure_aggregation=True))
    loop.run()
    learns = loop.server_learns()
    assert learns["server_receives"].startswith("only the sum")
    assert len(received) == 2 and all(len(uploads) == 20 for uploads in received)
    for uploads in received:
        assert all(v.dtype == torch.int64 and v.dim() == 1 for v in uploads.values())
    assert all(isinstance(total, UpdateSum) and total.clients == 20 for total in sums)
    assert "user" not in sums[0].rows and set(sums[0].rows) <= set(learns["tables_uploaded"])
    length = received[0][next(iter(received[0]))].numel()
    assert learns["bytes_received_per_round"] > 20 * length * 4  # the vector and the protocol


@pytest.mark.parametrize("privacy", [{"secure_aggregation": True},
                                     {**DP, "secure_aggregation": True}], ids=["alone", "dp"])
def test_the_clock_prices_secure_aggregation_as_the_protocol_counts_it(synthetic_data, privacy):
    """What the planner charges each client's uplink before training (the simulated clock)
    is what the protocol sends once the cohort's updates exist (rounds.csv's bytes_up)."""
    loop = _loop(synthetic_data, local_tables=["user"], privacy=PrivacyConfig(**privacy))
    cohort = loop.planner.plan([3, 8, 1], [5, 6, 7])
    loop.strategy.start_round(1, cohort.clients, seed=0)
    updates = loop.trainer.train_round(cohort)
    assert len(set(cohort.upload_bytes.tolist())) == 1
    assert int(cohort.upload_bytes.sum()) == loop.strategy.uploads(updates).bytes
    assert cohort.upload_bytes[0] > cohort.download_bytes.max()  # the union, not its own rows


def test_the_run_stops_before_the_round_that_would_pass_the_budget(synthetic_data):
    """A budget between the epsilons of rounds 7 and 8: the run ends after round 7, which
    is evaluated although evaluations fall every 5 rounds."""
    epsilon = _loop(synthetic_data, privacy=PrivacyConfig(noise_multiplier=3.0)).privacy.epsilon
    target = (epsilon(7) + epsilon(8)) / 2
    loop = _loop(synthetic_data, rounds=20, eval_interval=5,
                 privacy=PrivacyConfig(noise_multiplier=3.0, target_epsilon=target))
    assert loop.privacy.last_allowed_round == 7
    final = loop.run()
    assert loop.completed_rounds == 7 and final["round"] == 7
    assert final["epsilon"] == pytest.approx(epsilon(7), abs=1e-4)
    assert "privacy budget" in final["stopped_early"]
    kept = summary("synthetic", {}, final, {}, ReportConfig(), loop.module, None, 1.0)
    assert kept["stopped_early"] == final["stopped_early"]  # summary.json, so the report


@pytest.mark.parametrize(("kwargs", "privacy", "message"), [
    ({"selector": Oort()}, DP, "Oort does not sample clients at random"),
    ({"strategy": CoordinateMedian()}, DP, "needs an averaging strategy"),
    ({"reject_norm_ratio": 3.0}, {"secure_aggregation": True}, "reject_norm_ratio and privacy"),
    ({}, {**DP, "target_epsilon": 1e-3}, "below the epsilon of a single round"),
    ({"systems": SystemsConfig(enabled=True)}, DP, "simulated devices"),
])
def test_combinations_that_break_the_claims_are_refused_in_one_line(synthetic_data, kwargs,
                                                                     privacy, message):
    with pytest.raises(ConfigError, match=message):
        _loop(synthetic_data, privacy=PrivacyConfig(**privacy), **kwargs)


def test_an_unaccounted_selection_runs_when_asked_and_says_the_epsilon_does_not_hold(
        synthetic_data):
    loop = _loop(synthetic_data, rounds=1, selector=Oort(),
                 privacy=PrivacyConfig(**DP, unaccounted_sampling=True))
    loop.run()
    dp = loop.server_learns()["differential_privacy"]
    assert not dp["guarantee_holds"] and "Oort" in dp["why_not"]


def test_clipping_alone_reports_an_infinite_epsilon(synthetic_data):
    loop = _loop(synthetic_data, rounds=2, privacy=PrivacyConfig(noise_multiplier=0.0))
    final = loop.run()
    assert math.isinf(final["epsilon"])
    assert not loop.server_learns()["differential_privacy"]["guarantee_holds"]


def test_the_vectorized_and_sequential_trainers_give_the_same_private_model(synthetic_data):
    privacy = {**DP, "target_quantile": 0.5, "secure_aggregation": True}
    results = [_loop(synthetic_data, rounds=3, vectorize=vectorize,
                     privacy=PrivacyConfig(**privacy)) for vectorize in (True, False)]
    finals = [loop.run() for loop in results]
    assert finals[0]["auc"] == pytest.approx(finals[1]["auc"], abs=1e-4)
    assert results[0].strategy.strategy.clip_norm == pytest.approx(
        results[1].strategy.strategy.clip_norm, rel=1e-5)


def test_a_private_run_resumes_exactly(synthetic_data, tmp_path):
    """2 rounds, checkpoint, 2 more in a fresh loop: the same model and clip norm as 4 at
    once (noise drawn from the run's seed per round, the adaptive bound checkpointed)."""
    def build():
        return _loop(synthetic_data, rounds=4, eval_interval=2, local_tables=["user"],
                     privacy=PrivacyConfig(**DP, target_quantile=0.5, secure_aggregation=True))

    whole = build()
    expected = whole.run()
    _, second = stopped_and_resumed(build, tmp_path)
    assert_resumes_as_whole(second, whole, expected)
    assert second.strategy.strategy.clip_norm == whole.strategy.strategy.clip_norm


@pytest.mark.parametrize(("option", "message"), [
    (["--federated.selector.class_path", "fltoolkit.selection.Oort"],
     "privacy: Oort does not sample clients at random"),
    (["--privacy.secure_aggregation", "true", "--privacy.secagg_neighbours", "3"],
     "privacy.secagg_neighbours must be even"),
])
def test_the_command_refuses_in_one_line_and_leaves_no_run_directory(tmp_path, capsys, option,
                                                                      message):
    from fltoolkit.run.cli import main
    from tests.test_resume import EXPERIMENT

    run = tmp_path / "run"
    code = main(["fit", "--experiment", EXPERIMENT, "--data.num_rows", "5000",
                 "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 "--privacy.noise_multiplier", "1", *option, "--run_dir", str(run)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in error[-1] and not run.exists()
