"""The asynchronous timeline (FedBuff) and staleness weights, checked on hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fltoolkit.asynchronous import (
    Aggregation,
    Arrival,
    AsyncPolicy,
    AsyncTimeline,
    Job,
    StalenessWeight,
)

INF = math.inf


class Population:
    """Hand-made clients: client c's run takes seconds[c]; it is offline during
    offline[c] = (from, until) and not selectable then; the selection takes the lowest free
    ids. Records every start as (time, version, clients)."""

    def __init__(self, seconds: dict[int, float],
                 offline: dict[int, tuple[float, float]] | None = None,
                 reverse: bool = False) -> None:
        self.run_seconds, self.offline, self.reverse = seconds, offline or {}, reverse
        self.starts: list[tuple[float, int, list[int]]] = []
        self.now = 0.0

    def select(self, now: float, count: int, busy: frozenset[int]) -> list[int]:
        self.now = now
        chosen = [c for c in sorted(self.run_seconds)
                  if c not in busy and not self._off(c, now)][:count]
        return chosen[::-1] if self.reverse else chosen  # the timeline must not care

    def seconds(self, clients: list[int], version: int) -> list[float]:
        self.starts.append((self.now, version, clients))
        return [self.run_seconds[c] for c in clients]

    def offline_at(self, clients: list[int], now: float) -> list[float]:
        starts = [self.offline.get(c, (INF, INF))[0] for c in clients]
        return [start if now < start else INF for start in starts]

    def _off(self, client: int, now: float) -> bool:
        start, end = self.offline.get(client, (INF, INF))
        return start <= now < end


def timeline(population: Population, **policy) -> AsyncTimeline:
    return AsyncTimeline(AsyncPolicy(**policy), population.select, population.seconds,
                         population.offline_at)


def run(line: AsyncTimeline, aggregations: int) -> list[Aggregation]:
    return [line.advance() for _ in range(aggregations)]


def summary(aggregation: Aggregation) -> tuple:
    """(clock, version, to_train, [(client, start version, staleness)] buffered)."""
    return (aggregation.clock_s, aggregation.version, aggregation.to_train,
            [(a.client, a.start_version, a.staleness) for a in aggregation.buffered])


def staircase() -> Population:
    """Client c takes c + 1 seconds: clients 0, 1, 2 take 1, 2, 3 s."""
    return Population({c: c + 1.0 for c in range(6)})


# The 3-client timeline: concurrency 3, buffer 2, client c takes c + 1 s, the selection
# takes the lowest free ids (busy: in flight, or its update not yet aggregated).
#   t=0  start 0, 1, 2 from v0 (arrive at 1, 2, 3)
#   t=1  0 arrives (s=0); busy {0, 1, 2}: start 3 from v0 (arrives at 5)
#   t=2  1 arrives (s=0): buffer full -> A1 (v0): train 0, 1, 2, 3 (all started from v0)
#        start 0 from v1 (arrives at 3)
#   t=3  0 arrives (v1, s=0), then 2 (v0, s=1): buffer full -> A2 (v1): train 0
#        start 0, 1 from v2 (arrive at 4, 5)
#   t=4  0 arrives (s=0); start 2 from v2 (arrives at 7)
#   t=5  1 arrives (v2, s=0): buffer full -> A3 (v2): train 0, 1, 2
#        3 arrives (v0, s=3); start 0, 1 from v3 (arrive at 6, 7)
#   t=6  0 arrives (v3, s=0): buffer full -> A4 (v3): train 0, 1
def test_three_client_timeline_by_hand():
    population = staircase()
    aggregations = run(timeline(population, concurrency=3, buffer_size=2), 4)
    assert [summary(a) for a in aggregations] == [
        (2.0, 0, [0, 1, 2, 3], [(0, 0, 0), (1, 0, 0)]),
        (3.0, 1, [0], [(0, 1, 0), (2, 0, 1)]),
        (5.0, 2, [0, 1, 2], [(0, 2, 0), (1, 2, 0)]),
        (6.0, 3, [0, 1], [(3, 0, 3), (0, 3, 0)]),
    ]
    assert population.starts == [(0.0, 0, [0, 1, 2]), (1.0, 0, [3]), (2.0, 1, [0]),
                                 (3.0, 2, [0, 1]), (4.0, 2, [2]), (5.0, 3, [0, 1])]
    assert [a.started for a in aggregations] == [4, 1, 3, 2]
    weights = [u.weight for a in aggregations for u in a.buffered]  # 1 / sqrt(1 + s)
    assert weights == pytest.approx([1, 1, 1, 1 / math.sqrt(2), 1, 1, 1 / 2, 1], rel=1e-12)
    assert aggregations[3].buffered[0] == Arrival(client=3, start_version=0, start_s=1.0,
                                                  arrival_s=5.0, staleness=3, weight=0.5)


def test_simultaneous_events_run_by_kind_then_client():
    # client 1 arrives at t=1 and client 0 goes offline at t=1: the arrival comes first, so
    # it fills the buffer (A1) before the loss, which the next aggregation reports
    population = Population({0: 2.0, 1: 1.0, 2: 5.0}, offline={0: (1.0, INF)})
    first, second = run(timeline(population, concurrency=2, buffer_size=1), 2)
    assert summary(first) == (1.0, 0, [1], [(1, 0, 0)]) and first.lost == []
    assert second.lost == [Job(client=0, start_version=0, start_s=0.0, end_s=1.0,
                               arrives=False)]
    # the replacements of both start at t=1 from the new model v1: clients 1 and 2
    assert population.starts == [(0.0, 0, [0, 1]), (1.0, 1, [1, 2])]


def test_the_order_the_selection_gives_does_not_matter():
    forward = run(timeline(staircase(), concurrency=3, buffer_size=2), 6)
    backward = run(timeline(Population(staircase().run_seconds, reverse=True),
                            concurrency=3, buffer_size=2), 6)
    assert forward == backward


@pytest.mark.parametrize(("weight", "expected"), [
    (StalenessWeight(), [1, 0.7071067811865476, 0.5773502691896258, 0.5, 1 / 3]),  # 1/sqrt(1+s)
    (StalenessWeight("constant"), [1, 1, 1, 1, 1]),
    (StalenessWeight("polynomial", exponent=1.0), [1, 1 / 2, 1 / 3, 1 / 4, 1 / 9]),
    (StalenessWeight("polynomial", exponent=2.0), [1, 1 / 4, 1 / 9, 1 / 16, 1 / 81]),
    (StalenessWeight("polynomial", exponent=0.0), [1, 1, 1, 1, 1]),
    # 1 up to b = 1, then 1 / (a (s - b) + 1) with a = 2: s=2 -> 1/3, s=3 -> 1/5, s=8 -> 1/15
    (StalenessWeight("hinge", slope=2.0, hinge=1), [1, 1, 1 / 3, 1 / 5, 1 / 15]),
], ids=["fedbuff", "constant", "polynomial-1", "polynomial-2", "polynomial-0", "hinge"])
def test_staleness_weights_by_hand(weight, expected):
    assert [weight(s) for s in (0, 1, 2, 3, 8)] == pytest.approx(expected, rel=1e-12)


def test_an_update_staler_than_max_staleness_is_dropped_and_counted():
    # the 3-client timeline with max_staleness 2: A1-A3 as by hand above; at t=5 client 3
    # arrives with s=3 > 2 and is dropped (it takes no buffer slot, and stays busy until A4)
    #   t=5  start 0, 1 from v3 (arrive at 6, 7); t=6 0 arrives; busy {0, 1, 2, 3}: start 4
    #   t=7  1 arrives (v3, s=0): buffer full -> A4 (v3): train 0, 1, 4
    population = staircase()
    aggregations = run(timeline(population, concurrency=3, buffer_size=2, max_staleness=2), 4)
    unlimited = run(timeline(staircase(), concurrency=3, buffer_size=2), 3)
    assert aggregations[:3] == unlimited
    last = aggregations[3]
    assert summary(last) == (7.0, 3, [0, 1, 4], [(0, 3, 0), (1, 3, 0)])
    assert last.dropped_stale == [Arrival(3, 0, 1.0, 5.0, 3, 0.5)]
    assert population.starts[-2:] == [(5.0, 3, [0, 1]), (6.0, 3, [4])]


def test_a_client_offline_mid_run_is_lost_replaced_then_and_never_trained():
    # client 1 (arrival due at 2) goes offline at 1.5 for good:
    #   t=0 start 0, 1, 2; t=1 0 arrives, start 3 (arrives at 5)
    #   t=1.5 1 lost; start 4, the lowest free online client (arrives at 6.5)
    #   t=3 2 arrives: buffer full -> A1 (v0): train 0, 2, 3, 4; client 1 is not trained
    population = Population({c: c + 1.0 for c in range(6)}, offline={1: (1.5, INF)})
    first = timeline(population, concurrency=3, buffer_size=2).advance()
    assert summary(first) == (3.0, 0, [0, 2, 3, 4], [(0, 0, 0), (2, 0, 0)])
    assert first.lost == [Job(client=1, start_version=0, start_s=0.0, end_s=1.5,
                              arrives=False)]
    assert population.starts == [(0.0, 0, [0, 1, 2]), (1.0, 0, [3]), (1.5, 0, [4])]
    assert first.started == 5


def test_a_short_selection_is_retried_after_the_idle_wait():
    # the only client is offline until t=5; the server tries at 0, 2, 4 (idle_wait_s 2) and
    # starts it at 6; it arrives at 7 and fills the buffer of one
    population = Population({0: 1.0}, offline={0: (0.0, 5.0)})
    line = timeline(population, concurrency=1, buffer_size=1, idle_wait_s=2.0)
    assert summary(line.advance()) == (7.0, 0, [0], [(0, 0, 0)])
    assert population.starts == [(6.0, 0, [0])]


def test_equal_clients_with_a_full_buffer_are_synchronous_rounds():
    # buffer_size == concurrency and equal run times: each aggregation is a round of fresh
    # updates, and the same cohort restarts from the new model
    population = Population({c: 2.0 for c in range(5)})
    aggregations = run(timeline(population, concurrency=3, buffer_size=3), 3)
    assert [summary(a) for a in aggregations] == [
        (2.0 * (v + 1), v, [0, 1, 2], [(0, v, 0), (1, v, 0), (2, v, 0)]) for v in range(3)]
    assert population.starts == [(2.0 * v, v, [0, 1, 2]) for v in range(3)]


def test_a_buffer_larger_than_concurrency_fills_over_replacements():
    # one client at a time, two updates per aggregation: 0 runs [0, 1], 1 runs [1, 2]
    aggregation = timeline(Population({0: 1.0, 1: 1.0, 2: 1.0}), concurrency=1,
                           buffer_size=2).advance()
    assert summary(aggregation) == (2.0, 0, [0, 1], [(0, 0, 0), (1, 0, 0)])


def churn() -> Population:
    """Eight clients with varied run times; three go offline for a while."""
    seconds = np.random.default_rng(0).uniform(0.5, 4.0, 8).round(3)
    return Population(dict(enumerate(seconds.tolist())),
                      offline={1: (2.5, 9.0), 4: (6.0, 7.0), 6: (0.2, 30.0)})


def test_each_update_was_trained_from_the_version_its_client_started_at():
    """Play the caller: train `to_train` from the current version, keep the updates by
    client, consume the buffered and dropped ones. Every consumed update must exist and
    come from its start version; lost clients are never trained."""
    line = timeline(churn(), concurrency=4, buffer_size=2, max_staleness=1)
    kept: dict[int, int] = {}  # client -> the version its kept update was trained from
    trained, lost = set(), set()
    for aggregation in run(line, 40):
        for client in aggregation.to_train:
            assert client not in kept
            kept[client] = aggregation.version
            trained.add((client, aggregation.version))
        for update in aggregation.buffered + aggregation.dropped_stale:
            assert kept.pop(update.client) == update.start_version
        assert all(u.staleness <= 1 for u in aggregation.buffered)
        lost.update((job.client, job.start_version) for job in aggregation.lost)
    assert lost and not lost & trained
    assert kept == {job.client: job.start_version for job in line.in_flight.values()
                    if job.arrives and job.start_version < line.version}


def test_a_resumed_timeline_continues_identically():
    settings = {"concurrency": 4, "buffer_size": 2, "max_staleness": 1}
    line = timeline(churn(), **settings)
    reference, states = [], []
    for _ in range(30):
        reference.append(line.advance())
        states.append(json.loads(json.dumps(line.state_dict())))  # plain numbers and lists
    # the run passes through a pending retry, lost clients and stale drops
    assert any(state["retry_at"] is not None for state in states)
    assert any(a.lost for a in reference) and any(a.dropped_stale for a in reference)
    for done, state in enumerate(states[:-1], start=1):
        resumed = timeline(churn(), **settings)
        resumed.load_state_dict(state)
        assert run(resumed, 30 - done) == reference[done:], done


@pytest.mark.parametrize(("settings", "message"), [
    ({"concurrency": 0, "buffer_size": 1}, "concurrency must be >= 1"),
    ({"concurrency": 2, "buffer_size": 0}, "buffer_size must be >= 1"),
    ({"concurrency": 2, "buffer_size": 1, "max_staleness": -1}, "max_staleness must be >= 0"),
    ({"concurrency": 2, "buffer_size": 1, "idle_wait_s": 0.0}, "idle_wait_s must be"),
])
def test_bad_policies_fail_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as error:
        AsyncPolicy(**settings)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("settings", "message"), [
    ({"function": "cubic"}, "unknown staleness function 'cubic'; choose one of constant"),
    ({"exponent": -0.5}, "staleness exponent must be finite and >= 0"),
    ({"function": "hinge", "slope": math.nan}, "staleness slope must be finite"),
    ({"function": "hinge", "hinge": -1}, "staleness hinge must be finite and >= 0"),
])
def test_bad_staleness_weights_fail_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as error:
        StalenessWeight(**settings)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        StalenessWeight()(-1)


def test_callers_that_break_the_contract_are_refused():
    policy = AsyncPolicy(concurrency=2, buffer_size=1)
    def slow(clients, version):
        return [100.0] * len(clients)
    with pytest.raises(ValueError, match="at most 2 distinct clients that are not busy"):
        AsyncTimeline(policy, lambda now, count, busy: [0, 0], slow).advance()
    with pytest.raises(ValueError, match="at most 2 distinct clients"):
        AsyncTimeline(policy, lambda now, count, busy: [0, 1, 2], slow).advance()
    # 0 starts alone at t=0 (a retry is due at 60 s); at the retry, 0 is still in flight
    with pytest.raises(ValueError, match="busy among them: \\[0\\]"):
        AsyncTimeline(policy, lambda now, count, busy: [0], slow).advance()
    with pytest.raises(ValueError, match="run times must be finite and >= 0"):
        AsyncTimeline(policy, lambda now, count, busy: [0],
                      lambda clients, version: [-1.0]).advance()
    with pytest.raises(ValueError, match="must stay online past the start"):
        AsyncTimeline(policy, lambda now, count, busy: [0], slow,
                      lambda clients, now: [now]).advance()
