"""Client selectors: uniform is seeded, Oort's utility and preferences checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltoolkit.selection import Oort, UniformSelector
from fltoolkit.training.updates import ClientUpdate


def _update(client: int, num_samples: int, samples_trained: int, squares: float) -> ClientUpdate:
    return ClientUpdate(client=client, num_samples=num_samples, loss=0.0, dense=torch.zeros(1),
                        samples_trained=samples_trained, loss_squared_sum=squares)


def _oort(**kwargs) -> Oort:
    selector = Oort(**{"exploration": 0.0, "min_exploration": 0.0, "staleness": 0.0,
                       "cutoff": 1.0, **kwargs})
    selector.bind(num_clients=4, seed=0)
    return selector


def test_uniform_selection_is_seeded_and_distinct():
    first, second = UniformSelector(), UniformSelector()
    first.bind(100, seed=3), second.bind(100, seed=3)
    picked = first.select(1, 10)
    assert picked.tolist() == second.select(1, 10).tolist() and len(set(picked.tolist())) == 10


def test_oort_utility_is_samples_times_root_mean_squared_loss():
    selector = _oort()
    # 10 samples, trained twice (20 losses) whose squares sum to 5: 10 * sqrt(5 / 20) = 5
    selector.feedback(1, [_update(2, num_samples=10, samples_trained=20, squares=5.0)])
    assert selector.utility[2] == pytest.approx(5.0)


def test_oort_prefers_higher_utility_at_equal_speed_and_the_faster_at_equal_utility():
    selector = _oort(preferred_percentile=50.0)
    updates = [_update(0, 10, 10, 1.0), _update(1, 10, 10, 4.0),   # utilities 3.16, 6.32
               _update(2, 10, 10, 9.0), _update(3, 10, 10, 9.0)]   # 9.49 each
    durations = {0: 10.0, 1: 10.0, 2: 10.0, 3: 40.0}
    selector.feedback(1, updates, durations)
    assert selector.preferred_s == 10.0  # median of the round times
    scores = selector.scores(np.arange(4), round_index=2)
    # utilities sqrt(10) * (1, 2, 3, 3), scaled to [0, 1] over the explored clients (95th
    # percentile: 3 sqrt(10)): 0, 0.5, 1, 1; client 3 is 4x slower than T: penalty (10/40) ** 2
    np.testing.assert_allclose(scores, [0.0, 0.5, 1.0, 1 / 16])
    assert selector.select(2, 1).tolist() == [2]
    assert selector.select(3, 2).tolist() == [1, 2]


def test_oort_explores_unseen_clients_and_blacklists_the_over_selected():
    selector = Oort(exploration=1.0, max_participation=1)
    selector.bind(num_clients=6, seed=0)
    first = selector.select(1, 3)
    selector.feedback(1, [_update(int(c), 10, 10, 1.0) for c in first])
    second = selector.select(2, 3)
    assert set(first.tolist()).isdisjoint(second.tolist())  # explored ones are blacklisted


@pytest.mark.parametrize("selector", [UniformSelector(), Oort()])
def test_selectors_choose_only_online_clients(selector):
    selector.bind(num_clients=10, seed=1)
    available = np.zeros(10, dtype=bool)
    available[[2, 5, 7]] = True
    assert selector.select(1, 2, available).tolist() in ([2, 5], [2, 7], [5, 7])
    assert selector.select(2, 5, available).tolist() == [2, 5, 7]  # fewer online than wanted


def test_oort_pacer_relaxes_t_when_utility_flattens():
    selector = _oort(pacer_window=2, pacer_delta=5.0)
    for round_index in range(1, 5):  # four rounds of equal utility: flat
        selector.feedback(round_index, [_update(0, 10, 10, 1.0)], {0: 1.0})
    assert selector.preferred_percentile == 35.0


def test_oort_explores_fast_devices_first_once_their_times_are_known():
    selector = _oort(exploration=1.0, min_exploration=1.0, preferred_percentile=0.0,
                     max_participation=None)
    # stragglers of an earlier round: times known, no update; client 3's time still unknown
    selector.feedback(1, [], {0: 1.0, 1: 1.0, 2: 100.0})
    assert selector.penalty(np.arange(4)).tolist() == [1.0, 1.0, 1e-4, 1.0]  # (1 / 100) ** 2
    picks = np.concatenate([selector.select(r, 1) for r in range(2, 2002)])
    share = np.bincount(picks, minlength=4) / picks.size
    # drawn in proportion to the penalty: 1/3 each for 0, 1, 3; about 1/30000 for client 2
    np.testing.assert_allclose(share[[0, 1, 3]], 1 / 3, atol=0.04)
    assert share[2] < 0.002


def test_epoch_selector_takes_every_client_once_per_pass_in_a_seeded_order():
    from fltoolkit.selection import EpochSelector

    selector, again = EpochSelector(), EpochSelector()
    selector.bind(10, seed=4), again.bind(10, seed=4)
    rounds = [selector.select(r, 4).tolist() for r in range(1, 7)]
    assert rounds == [again.select(r, 4).tolist() for r in range(1, 7)]
    assert [len(chosen) for chosen in rounds] == [4, 4, 2, 4, 4, 2]  # a pass ends short
    for first_round in (0, 3):  # each pass: all ten clients, none twice
        assert sorted(sum(rounds[first_round:first_round + 3], [])) == list(range(10))
    assert rounds[:3] != rounds[3:]  # a new order every pass
    assert selector.passes == 1


def test_epoch_selector_keeps_an_offline_clients_turn_and_resumes_exactly():
    from fltoolkit.selection import EpochSelector

    selector = EpochSelector()
    selector.bind(6, seed=0)
    order = selector.remaining.tolist()
    online = np.ones(6, dtype=bool)
    online[order[0]] = False  # the first in line is offline this round
    assert selector.select(1, 2, online).tolist() == sorted(order[1:3])
    state = selector.state_dict()
    resumed = EpochSelector()
    resumed.bind(6, seed=99)
    resumed.load_state_dict(state)
    assert resumed.select(2, 2).tolist() == sorted([order[0], order[3]])  # its turn kept
    assert selector.select(2, 2).tolist() == sorted([order[0], order[3]])  # as uninterrupted
