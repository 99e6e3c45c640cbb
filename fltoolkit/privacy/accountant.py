"""The privacy budget of client-level DP-FedAvg: the epsilon that a number of rounds spends, and
the noise multiplier that a target epsilon needs.

A round is one sampled Gaussian mechanism over clients: a cohort is drawn from the population,
each update is clipped to norm C (`NormClipping`), and the sum gets Gaussian noise of standard
deviation noise_multiplier * C. The accounting is dp-accounting's; this module describes the
rounds as its events and checks the inputs, so that a bad one is a one-line error rather than a
wrong epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import dp_accounting
from dp_accounting import DpEvent, NeighboringRelation, pld, rdp

SamplingKind = Literal["poisson", "fixed_size"]
Method = Literal["pld", "rdp"]

# The privacy-loss grid of PLD. Its rounding is pessimistic (epsilon is only ever overstated),
# by an excess that shrinks with the square of the step: against a 10x finer grid, 2e-4
# overstated epsilon by < 0.05% for epsilon >= 0.25 and by 4e-4 at epsilon 0.05, and one call at
# 1000 rounds, q = 0.002, z = 1 takes ~0.1 s (dp-accounting's default 1e-4 takes twice as long).
PLD_DISCRETIZATION = 2e-4

# The noise multipliers `noise_multiplier_for` searches. Below 0.25 a PLD call takes seconds,
# for epsilons far beyond any useful budget; above 1000 the noise drowns every update.
NOISE_SEARCH_RANGE = (0.25, 1000.0)

# How close `noise_multiplier_for` gets to the least noise that meets the target: within 0.4%
# of it even at the low end of the range.
NOISE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ClientSampling:
    """How each round's cohort is drawn from `population` clients; the accounting depends on it.

    "poisson": each client joins independently with probability q = sample_size / population
    (sample_size is the expected cohort). Neighbouring datasets differ by adding or removing
    one client's data, as in McMahan et al. 2018.
    "fixed_size": exactly `sample_size` clients, uniformly without replacement, as
    `UniformSelector` draws them. dp-accounting bounds this only for datasets that differ by
    replacing one client's data, and only with RDP.
    """

    kind: SamplingKind
    population: int
    sample_size: int

    def __post_init__(self) -> None:
        if self.kind not in get_args(SamplingKind):
            raise ValueError(f"sampling must be 'poisson' or 'fixed_size', got {self.kind!r}")
        if self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")
        if not 1 <= self.sample_size <= self.population:
            raise ValueError(f"sample_size must be in [1, population={self.population}] (so that"
                             f" q = sample_size / population is in (0, 1]), got {self.sample_size}")

    @property
    def rate(self) -> float:
        """q: the probability that a given client takes part in a round."""
        return self.sample_size / self.population

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        """The neighbouring datasets that dp-accounting bounds this sampling for."""
        if self.kind == "poisson":
            return NeighboringRelation.ADD_OR_REMOVE_ONE
        return NeighboringRelation.REPLACE_ONE

    def round_event(self, noise_multiplier: float) -> DpEvent:
        """One round, for noise of standard deviation noise_multiplier * clip norm."""
        if self.kind == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                self.rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        # dp-accounting 0.6.0's RDP bound for this event takes the multiplier relative to the
        # replace-one sensitivity, which for a sum of clipped updates is twice the clip norm
        # (its open issue #378), although GaussianDpEvent defines it relative to the clip norm.
        # Halving it accounts for the noise actually added; pyproject pins the version.
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size,
            dp_accounting.GaussianDpEvent(noise_multiplier / 2))


def default_delta(population: int) -> float:
    """1 / population, the default of the DP-FedAvg issue. It is the loosest delta worth
    reporting: publishing one randomly chosen client's data outright already meets it, so
    prefer a smaller one where the budget allows."""
    if population < 2:
        raise ValueError(f"default_delta needs a population >= 2 (delta < 1), got {population}")
    return 1 / population


def _new_accountant(method: Method, sampling: ClientSampling) -> dp_accounting.PrivacyAccountant:
    """An empty accountant of `method`; a ValueError when it cannot account `sampling`."""
    if method == "pld":
        accountant: dp_accounting.PrivacyAccountant = pld.PLDAccountant(
            sampling.neighboring_relation, value_discretization_interval=PLD_DISCRETIZATION)
    elif method == "rdp":
        accountant = rdp.RdpAccountant(neighboring_relation=sampling.neighboring_relation)
    else:
        raise ValueError(f"method must be 'pld' or 'rdp', got {method!r}")
    # Refused rather than answered by the other method: `method` then always means what it says.
    if not accountant.supports(sampling.round_event(1.0)):
        raise ValueError(f"method={method!r} cannot account {sampling.kind} sampling"
                         " (dp-accounting has no such bound); use method='rdp'")
    return accountant


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not 0 < noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


class PrivacyAccountant:
    """Epsilon at `delta` spent by client-level DP-FedAvg after any number of rounds.

    Each call composes all the rounds at once (SelfComposedDpEvent), which costs about the same
    for 10 or 10,000 rounds, so the loop can ask after every evaluation without keeping a ledger.

    Args:
        noise_multiplier: noise standard deviation over the clip norm, as in DP-FedAvg.
        sampling: how each round's clients are drawn.
        delta: the delta of the (epsilon, delta) guarantee, e.g. `default_delta(population)`.
        method: "pld" (privacy loss distributions: tight, the default) or "rdp" (Renyi DP:
            looser, faster, and the only one that accounts fixed-size sampling).
    """

    def __init__(self, noise_multiplier: float, sampling: ClientSampling, delta: float,
                 method: Method = "pld") -> None:
        _check_noise_multiplier(noise_multiplier)
        _check_delta(delta)
        _new_accountant(method, sampling)  # refuses a bad method now, not at the first call
        self.noise_multiplier = noise_multiplier
        self.sampling = sampling
        self.delta = delta
        self.method = method

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds (0 before the first)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        if rounds == 0:  # dp-accounting refuses to compose an event zero times
            return 0.0
        event = dp_accounting.SelfComposedDpEvent(
            self.sampling.round_event(self.noise_multiplier), rounds)
        accountant = _new_accountant(self.method, self.sampling).compose(event)
        return float(accountant.get_epsilon(self.delta))


def noise_multiplier_for(target_epsilon: float, rounds: int, sampling: ClientSampling,
                         delta: float, method: Method = "pld") -> float:
    """The least noise multiplier (within NOISE_TOLERANCE, searched in NOISE_SEARCH_RANGE)
    whose epsilon after `rounds` is <= target_epsilon: dp-accounting's calibration, which
    guarantees the side of the target it lands on."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 to calibrate noise, got {rounds}")
    _check_delta(delta)
    _new_accountant(method, sampling)  # refuses a bad method before the search
    least, most = NOISE_SEARCH_RANGE
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _new_accountant(method, sampling),
            lambda z: dp_accounting.SelfComposedDpEvent(sampling.round_event(z), rounds),
            target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(least, most), tol=NOISE_TOLERANCE))
    except ValueError as error:
        missed = _missed_bound(target_epsilon, rounds, sampling, delta, method)
        if missed is None:
            raise
        raise ValueError(missed) from error


def _missed_bound(target_epsilon: float, rounds: int, sampling: ClientSampling, delta: float,
                  method: Method) -> str | None:
    """After a failed calibration, which end of NOISE_SEARCH_RANGE the target lies beyond
    (dp-accounting's message names neither), or None when it lies within."""
    least, most = NOISE_SEARCH_RANGE
    spent = PrivacyAccountant(most, sampling, delta, method).epsilon(rounds)
    if spent > target_epsilon:
        return (f"target_epsilon={target_epsilon:g} is out of reach: even noise multiplier"
                f" {most:g} spends epsilon {spent:.4g} in {rounds} rounds")
    spent = PrivacyAccountant(least, sampling, delta, method).epsilon(rounds)
    if spent <= target_epsilon:
        return (f"target_epsilon={target_epsilon:g} holds even at noise multiplier {least:g}"
                f" (epsilon {spent:.4g}), the least searched: it bounds no useful noise")
    return None
