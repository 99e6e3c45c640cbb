"""Runs with shared tables under a memory budget (fltoolkit.embeddings wired into the loop):
method none changes nothing, every method keeps its physical size and learns, adaembed
re-balances, a resumed run is the uninterrupted one, and what is not supported is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fltoolkit.embeddings.config import EmbeddingBudgetConfig
from fltoolkit.privacy.config import PrivacyConfig
from fltoolkit.run.checkpointing import load_loop_state, loop_state
from fltoolkit.run.config import ConfigError
from fltoolkit.strategies import FedAdam
from tests.test_federated import _loop, _state


def _rounds(loop) -> list[dict]:
    """Run `loop`, returning its rounds.csv rows."""
    rows: list[dict] = []
    loop.hooks = type(loop.hooks)(on_round=rows.append)
    loop.run()
    return rows


def test_method_none_is_the_run_without_the_section(synthetic_data):
    plain = _loop(synthetic_data, rounds=2)
    plain.run()
    none = _loop(synthetic_data, rounds=2, embeddings=EmbeddingBudgetConfig())
    none.run()
    assert none.budget is None
    expected, got = _state(plain.module), _state(none.module)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert plain.last["auc"] == none.last["auc"]


@pytest.mark.parametrize("method", ["adaembed", "frequency", "hashing"])
def test_each_method_keeps_its_physical_size_and_learns(synthetic_data, method):
    config = EmbeddingBudgetConfig(method=method, budget=0.5, prune_interval=2)
    loop = _loop(synthetic_data, embeddings=config, rounds=6, clients_per_round=40,
                 eval_interval=3, local_epochs=3)
    rows = _rounds(loop)
    cardinalities = dict(zip(synthetic_data.features.sparse,
                             synthetic_data.features.cardinalities, strict=True))
    physical = {name: row_map.physical_rows for name, row_map in loop.budget.maps.items()}
    whole = {name for name, ids in cardinalities.items() if ids <= config.keep_whole}
    assert whole and set(physical) == set(cardinalities) - whole
    fallback = method != "hashing"
    for name, part in loop.parts.tables.items():
        assert part.weight.shape[0] == physical.get(name, cardinalities[name])
    owned = sum(physical.values()) - fallback * len(physical) + sum(
        cardinalities[name] for name in whole)
    assert sum(cardinalities.values()) // 2 - len(physical) <= owned <= sum(
        cardinalities.values()) // 2  # a total budget of half the ids, rounded down per table
    assert {row["table_rows"] for row in rows} == {owned + fallback * len(physical)}
    assert loop.last["auc"] > 0.58  # whole tables: 0.61
    summary = loop.embedding_rows()
    assert summary["embedding_rows"] == owned + fallback * len(physical)
    assert summary["embedding_rows_logical"] == sum(cardinalities.values())
    assert (summary["embedding_method"], summary["embedding_budget"],
            summary["embedding_scope"]) == (method, 0.5, "total")


def test_a_budget_per_table_budgets_each_table(synthetic_data):
    config = EmbeddingBudgetConfig(method="frequency", budget=0.5, scope="table", keep_whole=0)
    loop = _loop(synthetic_data, embeddings=config, rounds=1)
    for name, ids in zip(synthetic_data.features.sparse, synthetic_data.features.cardinalities,
                         strict=True):
        assert loop.parts.tables[name].weight.shape[0] == max(1, ids // 2) + 1


def test_local_tables_stay_whole_under_a_budget(synthetic_data):
    loop = _loop(synthetic_data, rounds=2, local_tables=["user"],
                 embeddings=EmbeddingBudgetConfig(method="frequency", budget=0.5))
    loop.run()
    assert "user" not in loop.budget.maps
    assert loop.parts.tables["user"].weight.shape[0] == synthetic_data.features.cardinalities[0]


def test_adaembed_rebalances_and_admits_an_id_that_becomes_important(synthetic_data):
    config = EmbeddingBudgetConfig(method="adaembed", budget=0.25, prune_interval=2, decay=0.5)
    loop = _loop(synthetic_data, rounds=4, embeddings=config, strategy=FedAdam(server_lr=0.05))
    rows = _rounds(loop)
    assert rows[0]["rows_admitted"] > 0 and rows[0]["rows_evicted"] == 0  # the cold start
    assert rows[2]["rows_evicted"] == rows[2]["rows_admitted"] == 0  # not due
    assert sum(row["rows_evicted"] for row in rows[1:]) > 0
    row_map, scores = loop.budget.maps["adgroup_id"], loop.budget.importance.scores["adgroup_id"]
    outside = torch.nonzero(~row_map.admitted() & (scores == 0)).flatten()
    risen = int(outside[0])
    loop.budget.importance.scores["adgroup_id"][risen] = scores.max() * 10
    changed = loop.budget.end_round(6, None, [], loop.server_tables.owned(), loop.strategy)
    assert changed["rows_admitted"] >= 1 and bool(row_map.admitted()[risen])
    row = int(row_map.lookup(torch.tensor(risen)))
    weight = loop.server_tables.owned()["adgroup_id"]
    assert torch.equal(weight[row], weight[row_map.fallback])  # starts as the fallback
    moments = loop.strategy.moments["adgroup_id"]
    assert float(moments["m"][row].abs().sum()) == 0.0  # the server's moments start afresh


def test_adaembed_from_counts_starts_at_the_frequency_rows_and_rebalances_when_due(
        synthetic_data):
    counts = EmbeddingBudgetConfig(method="adaembed", budget=0.25, prune_interval=2,
                                   start="counts")
    frequency = _loop(synthetic_data, rounds=1, embeddings=replace(counts, method="frequency"))
    loop = _loop(synthetic_data, rounds=4, embeddings=counts)
    for name, row_map in loop.budget.maps.items():
        assert torch.equal(row_map.logical_to_physical,
                           frequency.budget.maps[name].logical_to_physical)
    rows = _rounds(loop)
    assert [row["rows_admitted"] > 0 for row in rows] == [False, True, False, True]


def test_budgeted_rounds_train_alike_vectorized_and_sequential(synthetic_data):
    config = EmbeddingBudgetConfig(method="adaembed", budget=0.25, prune_interval=2)
    runs = [_loop(synthetic_data, rounds=4, embeddings=config, vectorize=vectorize)
            for vectorize in (True, False)]
    for loop in runs:
        loop.run()
    together, alone = runs
    assert type(together.trainer).__name__ == "VectorizedTrainer"
    for name, row_map in together.budget.maps.items():
        assert torch.equal(row_map.logical_to_physical,
                           alone.budget.maps[name].logical_to_physical)
    expected, got = _state(alone.module), _state(together.module)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)


def test_a_resumed_budgeted_run_is_the_uninterrupted_one(synthetic_data):
    config = EmbeddingBudgetConfig(method="adaembed", budget=0.5, prune_interval=2)
    whole = _loop(synthetic_data, rounds=4, embeddings=config, strategy=FedAdam(server_lr=0.05))
    whole.run()
    first = _loop(synthetic_data, rounds=4, embeddings=config, strategy=FedAdam(server_lr=0.05))
    first.config.rounds = 3
    first.run()
    state = loop_state(first)
    resumed = _loop(synthetic_data, rounds=4, embeddings=config,
                    strategy=FedAdam(server_lr=0.05))
    load_loop_state(resumed, state)
    resumed.run()
    expected, got = _state(whole.module), _state(resumed.module)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    for name, row_map in whole.budget.maps.items():
        assert torch.equal(row_map.logical_to_physical,
                           resumed.budget.maps[name].logical_to_physical)
        assert torch.equal(whole.budget.importance.scores[name],
                           resumed.budget.importance.scores[name])


@pytest.mark.parametrize(("settings", "embeddings", "refused"), [
    ({"mode": "async", "concurrency": 4}, {}, "federated.mode async"),
    ({"keep_optimizer_state": True}, {}, "keep_optimizer_state"),
    ({}, {"budget": 10_000}, "exceeds"),
])
def test_what_budgeted_tables_do_not_run_with_is_refused(synthetic_data, settings, embeddings,
                                                          refused):
    config = EmbeddingBudgetConfig(**{"method": "adaembed", "budget": 0.5, **embeddings})
    with pytest.raises(ConfigError, match=refused):
        _loop(synthetic_data, embeddings=config, **settings)


def test_privacy_and_a_budget_without_a_method_are_refused(synthetic_data):
    with pytest.raises(ConfigError, match="privacy"):
        _loop(synthetic_data, embeddings=EmbeddingBudgetConfig(method="frequency", budget=0.5),
              privacy=PrivacyConfig(noise_multiplier=0.5, clip_norm=1.0))
    with pytest.raises(ValueError, match="method is none"):
        EmbeddingBudgetConfig(budget=0.5)


def test_fit_writes_the_budgets_columns_and_summary(tmp_path):
    from tests.test_cli import _csv_rows, _fit

    run = tmp_path / "run"
    assert _fit(tmp_path, "--run_dir", str(run), "--federated.rounds", "4",
                "--federated.clients_per_round", "20", "--federated.eval_interval", "2",
                "--federated.local_tables", "[user]", "--embeddings.method", "adaembed",
                "--embeddings.budget", "0.5", "--embeddings.prune_interval", "2") == 0
    rounds = _csv_rows(run / "rounds.csv")
    assert len({r["table_rows"] for r in rounds}) == 1
    assert int(rounds[0]["rows_admitted"]) > 0 and rounds[2]["rows_admitted"] == "0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["embedding_method"] == "adaembed" and summary["embedding_budget"] == 0.5
    assert summary["embedding_rows"] < summary["embedding_rows_logical"]
    assert summary["embedding_rows"] == int(rounds[0]["table_rows"]) + 436  # + whole user table


def test_fit_refuses_a_budget_with_privacy_in_one_line(tmp_path, capsys):
    from tests.test_cli import _fit

    assert _fit(tmp_path, "--run_dir", str(tmp_path / "run"), "--embeddings.method", "hashing",
                "--embeddings.budget", "0.5", "--privacy.noise_multiplier", "0.5",
                "--privacy.clip_norm", "1.0") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "embeddings.method hashing with the privacy section" in error[0]
    assert not (tmp_path / "run").exists()
