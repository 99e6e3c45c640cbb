"""Embedding tables under a memory budget, worked out by hand on a table of 5 ids.

One scenario runs through the importance, eviction and re-admission tests (decay 0.5, a
budget of 2 rows, the fallback is row 2):

    round 1: ids 0, 2, 3 touched by 2, 1, 3 clients, row-delta norms 1, 4, 2
             scores = 0.5 * 0 + 0.5 * (2*1, 0, 1*4, 3*2, 0)   = (1, 0, 2, 3, 0)
    round 2: ids 1, 2 touched by 2, 1 clients, norms 3, 2
             scores = 0.5 * (1, 0, 2, 3, 0) + 0.5 * (0, 6, 2, 0, 0) = (0.5, 3, 2, 1.5, 0)
    round 3: id 3 touched by 2 clients, norm 4
             scores = 0.5 * (0.5, 3, 2, 1.5, 0) + 0.5 * (0, 0, 0, 8, 0) = (0.25, 1.5, 1, 4.75, 0)
"""

from __future__ import annotations

import io

import pytest
import torch

from fltoolkit.embeddings import (
    BudgetPolicy,
    RoundSignal,
    RowBudget,
    RowImportance,
    RowMap,
    frequency_map,
    hashed_map,
    initialize_admitted,
    round_signal,
    training_counts,
)
from fltoolkit.strategies.base import RowSum

ROUNDS = [RoundSignal(torch.tensor([0, 2, 3]), torch.tensor([2, 1, 3]),
                      torch.tensor([1.0, 4.0, 2.0])),
          RoundSignal(torch.tensor([1, 2]), torch.tensor([2, 1]), torch.tensor([3.0, 2.0])),
          RoundSignal(torch.tensor([3]), torch.tensor([2]), torch.tensor([4.0]))]
SCORES = [[1.0, 0.0, 2.0, 3.0, 0.0], [0.5, 3.0, 2.0, 1.5, 0.0], [0.25, 1.5, 1.0, 4.75, 0.0]]


def _scores(importance: RowImportance) -> list[float]:
    return importance.scores["ad"].tolist()


def _rows(row_map: RowMap) -> list[int]:
    return row_map.logical_to_physical.tolist()


def test_importance_is_a_moving_average_of_clients_times_norm():
    importance = RowImportance({"ad": 5, "user": 3}, decay=0.5)
    for signal, expected in zip(ROUNDS, SCORES, strict=True):
        importance.update("ad", signal)
        assert _scores(importance) == expected
    assert importance.scores["user"].tolist() == [0.0, 0.0, 0.0]


def test_importance_by_clients_alone_drops_the_norm():
    # decay 0.5, gains = clients: (2, 0, 1, 3, 0), then (0, 2, 1, 0, 0), then (0, 0, 0, 2, 0)
    importance = RowImportance({"ad": 5}, decay=0.5, signal="clients")
    expected = [[1.0, 0.0, 0.5, 1.5, 0.0], [0.5, 1.0, 0.75, 0.75, 0.0],
                [0.25, 0.5, 0.375, 1.375, 0.0]]
    for signal, scores in zip(ROUNDS, expected, strict=True):
        importance.update("ad", signal)
        assert _scores(importance) == scores


def test_an_untouched_round_only_decays():
    importance = RowImportance({"ad": 5}, decay=0.5)
    importance.update("ad", ROUNDS[0])
    empty = torch.zeros(0, dtype=torch.int64)
    importance.update("ad", RoundSignal(empty, empty, torch.zeros(0)))
    assert _scores(importance) == [0.5, 0.0, 1.0, 1.5, 0.0]


def test_round_signal_counts_clients_and_reads_the_norm_of_each_ids_row():
    # ids 0 -> row 0, 3 -> row 1, ids 1, 2, 4 -> the fallback row 2
    row_map = RowMap(torch.tensor([0, 2, 2, 1, 2]), budget=2)
    touched = torch.tensor([0, 1, 0, 2, 3, 1])  # clients {0, 1}, {0, 2, 3}, {1}
    # mean deltas: row 0 (6, 8) / 2 = (3, 4), norm 5; row 1 never weighted, norm 0;
    # the fallback (0, 3) / 3 = (0, 1), norm 1
    sums = RowSum(torch.tensor([0, 1, 2]), torch.tensor([[6.0, 8.0], [0.0, 0.0], [0.0, 3.0]]),
                  torch.tensor([2.0, 0.0, 3.0]))
    signal = round_signal(touched, row_map, sums)
    assert signal.ids.tolist() == [0, 1, 2, 3]
    assert signal.counts.tolist() == [2, 2, 1, 1]
    assert signal.norms.tolist() == [5.0, 1.0, 1.0, 0.0]
    assert round_signal(touched, row_map, None).norms.tolist() == [0.0] * 4


def test_eviction_and_readmission_within_a_budget_of_two_rows():
    importance = RowImportance({"ad": 5}, decay=0.5)
    policy = BudgetPolicy()
    row_map = RowMap.all_fallback(5, 2)
    assert _rows(row_map) == [2] * 5

    # round 1, scores (1, 0, 2, 3, 0): ids 3 and 2 rank first and take the free rows 0 and 1
    # in id order; id 0 (score 1) stays on the fallback
    importance.update("ad", ROUNDS[0])
    change = policy.rebalance(row_map, importance.scores["ad"])
    assert change.evicted.tolist() == [] and change.admitted.tolist() == [2, 3]
    assert change.changed_rows.tolist() == [0, 1] and change.size == 2
    assert _rows(row_map) == [2, 2, 0, 1, 2]

    # round 2, scores (0.5, 3, 2, 1.5, 0): id 1 overtakes id 3, which goes to the fallback and
    # frees row 1; id 1 gets row 1; id 2 keeps row 0
    importance.update("ad", ROUNDS[1])
    change = policy.rebalance(row_map, importance.scores["ad"])
    assert change.evicted.tolist() == [3] and change.admitted.tolist() == [1]
    assert change.changed_rows.tolist() == [1] and change.size == 2
    assert _rows(row_map) == [2, 1, 0, 2, 2]

    # round 3, scores (0.25, 1.5, 1, 4.75, 0): evicted id 3 overtakes id 2 and is re-admitted
    # into the row id 2 frees, row 0
    importance.update("ad", ROUNDS[2])
    change = policy.rebalance(row_map, importance.scores["ad"])
    assert change.evicted.tolist() == [2] and change.admitted.tolist() == [3]
    assert change.changed_rows.tolist() == [0] and change.size == 2
    assert _rows(row_map) == [2, 1, 2, 0, 2]
    assert row_map.owners().tolist() == [3, 1, -1]  # the fallback is shared by ids 0, 2, 4
    assert row_map.lookup(torch.tensor([[3, 4], [1, 0]])).tolist() == [[0, 2], [1, 2]]


def test_hysteresis_keeps_ids_an_evicted_one_does_not_beat_by_the_margin():
    # held ids 2 and 3 (scores 2, 1.5) rank as 4 and 3 with hysteresis 1; id 1's 3 only ties
    # id 3, and ties go to the id holding a row
    row_map = RowMap(torch.tensor([2, 2, 0, 1, 2]), budget=2)
    change = BudgetPolicy(hysteresis=1.0).rebalance(row_map, torch.tensor(SCORES[1]))
    assert change.evicted.tolist() == change.admitted.tolist() == []
    assert change.size == 2 and _rows(row_map) == [2, 2, 0, 1, 2]
    change = BudgetPolicy(hysteresis=0.25).rebalance(row_map, torch.tensor(SCORES[1]))
    assert change.evicted.tolist() == [3] and change.admitted.tolist() == [1]


def test_admitted_rows_start_from_the_fallbacks_value():
    row_map = RowMap(torch.tensor([2, 2, 0, 1, 2]), budget=2)
    weight = torch.tensor([[1.0, 1.0], [2.0, 2.0], [7.0, 8.0]])
    change = BudgetPolicy().rebalance(row_map, torch.tensor(SCORES[1]))
    initialize_admitted(weight, change, row_map)
    assert weight.tolist() == [[1.0, 1.0], [7.0, 8.0], [7.0, 8.0]]


def test_prune_interval_says_when_to_rebalance():
    assert [BudgetPolicy(prune_interval=3).due(r) for r in range(6)] == [
        False, False, True, False, False, True]


def _per_table(budget: int | float, ids: int) -> int:
    return RowBudget(budget, scope="table", keep_whole=0).split({"t": ids})["t"]


def test_budget_rows_per_table_from_rows_and_fractions():
    assert _per_table(2, 5) == 2
    assert _per_table(1.0, 5) == 5
    assert _per_table(0.5, 5) == 2  # 2.5 rounds down: a budget is a ceiling
    assert _per_table(0.1, 5) == 1  # at least one row
    assert _per_table(0.29, 100) == 29
    # tables of at most keep_whole ids are held whole (left out), in either scope
    assert RowBudget(0.5, scope="table", keep_whole=4).split({"a": 4, "b": 10}) == {"b": 5}


def test_a_total_budget_holds_small_tables_whole_and_shares_the_rest_by_ids():
    sizes = {"pid": 4, "age": 9, "user": 600, "ad": 300, "brand": 100}  # 1013 ids
    # half: floor(506.5) = 506 rows; pid and age (13 ids) whole: 493 for 3 tables, one row
    # each, then 490 by ids (1000): user 1 + 490 * 600 // 1000 = 295, ad 148, brand 50
    assert RowBudget(0.5, keep_whole=10).split(sizes) == {"user": 295, "ad": 148, "brand": 50}
    assert 295 + 148 + 50 + 13 <= 506
    # 200 rows in all: 187 left, 184 by ids: user 1 + 110 = 111, ad 1 + 55 = 56, brand 19
    assert RowBudget(200, keep_whole=10).split(sizes) == {"user": 111, "ad": 56, "brand": 19}
    assert RowBudget(1.0, keep_whole=1000).split(sizes) == {}  # every table whole


def test_frequency_baseline_keeps_the_most_frequent_ids():
    counts = torch.tensor([5, 0, 7, 5, 1])
    # id 2 (7), then ids 0 and 3 tie at 5: the lower id wins
    assert _rows(frequency_map(counts, 2)) == [0, 2, 1, 2, 2]
    # the same ids as min_count 5 (counts >= 5: ids 0, 2, 3)
    assert frequency_map(counts, 3).admitted().tolist() == (counts >= 5).tolist()
    # an id never seen gets no row even when the budget has room
    full = frequency_map(counts, 5)
    assert _rows(full) == [0, 5, 1, 2, 3] and full.owners().tolist() == [0, 2, 3, 4, -1, -1]


def test_training_counts_count_every_column_of_a_table():
    sparse = torch.tensor([[0, 2, 9], [2, 3, 9], [2, 2, 9]])
    assert training_counts(sparse, [0, 1], 5).tolist() == [1, 0, 4, 1, 0]


def _splitmix64(seed: int, index: int) -> int:
    """SplitMix64's index-th output, in Python integers (a reference independent of numpy)."""
    mask = (1 << 64) - 1
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_hashing_maps_every_id_deterministically_into_the_budget():
    hashed = hashed_map(1000, 7, seed=3)
    rows = hashed.logical_to_physical
    assert rows.tolist() == [_splitmix64(3, i) % 7 for i in range(1000)]
    assert torch.equal(rows, hashed_map(1000, 7, seed=3).logical_to_physical)
    assert not torch.equal(rows, hashed_map(1000, 7, seed=4).logical_to_physical)
    assert hashed.fallback is None and hashed.physical_rows == 7
    assert set(rows.tolist()) == set(range(7)) and bool(hashed.admitted().all())
    assert hashed_map(1, 7, seed=3).owners().tolist()[rows[0]] == 0  # one id alone in its row


def test_hashing_maps_are_not_pruned():
    with pytest.raises(ValueError, match="cannot be pruned"):
        BudgetPolicy().rebalance(hashed_map(5, 2, seed=0), torch.ones(5))


def _through_a_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_row_map_state_round_trips():
    row_map = RowMap(torch.tensor([2, 1, 2, 0, 2]), budget=2)
    restored = RowMap.all_fallback(5, 2)
    restored.load_state_dict(_through_a_checkpoint(row_map.state_dict()))
    assert torch.equal(restored.logical_to_physical, row_map.logical_to_physical)
    with pytest.raises(ValueError, match="cannot load"):
        RowMap.all_fallback(5, 3).load_state_dict(row_map.state_dict())


def test_importance_state_round_trips():
    importance = RowImportance({"ad": 5}, decay=0.5)
    importance.update("ad", ROUNDS[0])
    restored = RowImportance({"ad": 5}, decay=0.5)
    restored.load_state_dict(_through_a_checkpoint(importance.state_dict()))
    restored.update("ad", ROUNDS[1])
    assert _scores(restored) == SCORES[1]
    with pytest.raises(ValueError, match="cannot load"):
        RowImportance({"ad": 4}, decay=0.5).load_state_dict(importance.state_dict())


def test_a_row_map_refuses_invalid_rows():
    with pytest.raises(ValueError, match="outside 0..2"):
        RowMap(torch.tensor([0, 3]), budget=2)
    with pytest.raises(ValueError, match="the same row"):
        RowMap(torch.tensor([0, 0, 2]), budget=2)
    with pytest.raises(ValueError, match="int64"):
        RowMap(torch.tensor([0.0, 1.0]), budget=2)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: RowBudget(0), "at least 1 row"),
    (lambda: _per_table(6, 5), "exceeds a table of 5 ids"),
    (lambda: RowBudget(30).split({"a": 20, "b": 9}), "exceeds the shared tables' 29 ids"),
    (lambda: RowBudget(10, keep_whole=9).split({"a": 20, "b": 9, "c": 30}),
     "take 9 whole, which leaves 1 for the other 2 tables"),
    (lambda: RowBudget(0.5, keep_whole=1000).split({"a": 20, "b": 9}),
     "gives 14 rows in total, the tables of at most embeddings.keep_whole 1000 ids take 29"),
    (lambda: RowBudget(0.0), r"fraction must be in \(0, 1\]"),
    (lambda: RowBudget(1.5), r"fraction must be in \(0, 1\]"),
    (lambda: RowBudget(True), "number of rows or a fraction"),
    (lambda: RowBudget("half"), "number of rows or a fraction"),
    (lambda: RowBudget(0.5, scope="all"), "scope must be total or table"),
    (lambda: RowBudget(0.5, keep_whole=-1), "keep_whole"),
    (lambda: BudgetPolicy(prune_interval=0), "prune_interval"),
    (lambda: BudgetPolicy(prune_interval=1.5), "prune_interval"),
    (lambda: BudgetPolicy(hysteresis=-0.1), "hysteresis"),
    (lambda: RowImportance({"ad": 5}, decay=1.0), r"decay must be in \[0, 1\)"),
    (lambda: RowImportance({"ad": 5}, decay=0.5, signal="norm"), "clients_x_norm or clients"),
    (lambda: RowImportance({"ad": 5}, decay=-0.5), r"decay must be in \[0, 1\)"),
])
def test_bad_settings_fail_in_one_line(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)
