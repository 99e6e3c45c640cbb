"""The DP-FedAvg privacy accountant against dp-accounting called by hand and the Gaussian
mechanism's closed form, its calibration, and `fltk privacy`."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import NeighboringRelation, pld, rdp
from scipy.optimize import brentq
from scipy.special import ndtr

from fltoolkit.privacy.accountant import (
    PLD_DISCRETIZATION,
    ClientSampling,
    PrivacyAccountant,
    default_delta,
    noise_multiplier_for,
)
from fltoolkit.run.cli import main

REPO = Path(__file__).resolve().parents[1]


def _by_hand(kind: str, population: int, sample_size: int, z: float, rounds: int, delta: float,
             method: str) -> float:
    """The same accounting written against dp-accounting directly."""
    if kind == "poisson":
        relation = NeighboringRelation.ADD_OR_REMOVE_ONE
        round_event = dp_accounting.PoissonSampledDpEvent(
            sample_size / population, dp_accounting.GaussianDpEvent(z))
    else:
        relation = NeighboringRelation.REPLACE_ONE
        # dp-accounting 0.6.0 reads this multiplier against the replace-one sensitivity, 2 C
        round_event = dp_accounting.SampledWithoutReplacementDpEvent(
            population, sample_size, dp_accounting.GaussianDpEvent(z / 2))
    accountant = (pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
                  if method == "pld" else rdp.RdpAccountant(neighboring_relation=relation))
    accountant.compose(dp_accounting.SelfComposedDpEvent(round_event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("kind", "population", "sample_size", "z", "rounds", "delta", "method"), [
    ("poisson", 10_000, 20, 1.0, 1000, 1e-5, "pld"),
    ("poisson", 1000, 50, 0.8, 300, 1e-3, "pld"),
    ("poisson", 10_000, 20, 1.0, 1000, 1e-5, "rdp"),
    ("poisson", 1000, 50, 0.8, 300, 1e-3, "rdp"),
    ("fixed_size", 10_000, 20, 1.0, 1000, 1e-4, "rdp"),
    ("fixed_size", 500, 25, 1.5, 200, 1e-3, "rdp"),
])
def test_epsilon_is_dp_accounting_s(kind, population, sample_size, z, rounds, delta, method):
    sampling = ClientSampling(kind, population, sample_size)
    epsilon = PrivacyAccountant(z, sampling, delta, method).epsilon(rounds)
    expected = _by_hand(kind, population, sample_size, z, rounds, delta, method)
    assert epsilon == pytest.approx(expected, rel=1e-12)
    assert 0.1 < epsilon < 20


def _gaussian_epsilon(z: float, delta: float) -> float:
    """The Gaussian mechanism's exact epsilon at delta (Balle & Wang 2018, Theorem 8):
    delta(eps) = Phi(-eps z + 1/(2z)) - e^eps Phi(-eps z - 1/(2z))."""
    def excess(eps: float) -> float:
        return ndtr(-eps * z + 1 / (2 * z)) - math.exp(eps) * ndtr(-eps * z - 1 / (2 * z)) - delta

    return brentq(excess, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize(("z", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-3)])
def test_everyone_for_one_round_is_the_gaussian_mechanism(z, delta):
    everyone = ClientSampling("poisson", 100, 100)
    epsilon = PrivacyAccountant(z, everyone, delta).epsilon(1)
    exact = _gaussian_epsilon(z, delta)
    # e.g. z=1, delta=1e-5: 4.4; PLD's pessimistic grid may only overstate it
    assert exact <= epsilon <= exact * (1 + 1e-3)


def test_fixed_size_counts_the_replace_one_sensitivity_of_a_clipped_sum():
    """Replacing one of all the clients moves the clipped sum by up to 2 C, so the cohort of
    everyone at noise z C is a Gaussian mechanism of multiplier z / 2."""
    everyone = ClientSampling("fixed_size", 10, 10)
    epsilon = PrivacyAccountant(2.0, everyone, 1e-5, "rdp").epsilon(1)
    half_noise = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.0))
    assert epsilon == pytest.approx(half_noise.get_epsilon(1e-5), rel=1e-12)
    assert epsilon > PrivacyAccountant(2.0, ClientSampling("poisson", 10, 10), 1e-5,
                                       "rdp").epsilon(1)


@pytest.mark.parametrize(("kind", "method"), [("poisson", "pld"), ("poisson", "rdp"),
                                              ("fixed_size", "rdp")])
def test_more_rounds_spend_more_and_more_noise_spends_less(kind, method):
    sampling = ClientSampling(kind, 1000, 10)
    accountant = PrivacyAccountant(1.0, sampling, 1e-3, method)
    by_rounds = [accountant.epsilon(rounds) for rounds in (0, 1, 10, 100, 1000)]
    assert by_rounds[0] == 0.0
    assert by_rounds == sorted(set(by_rounds))
    by_noise = [PrivacyAccountant(z, sampling, 1e-3, method).epsilon(100)
                for z in (0.6, 1.0, 1.5, 3.0)]
    assert by_noise == sorted(set(by_noise), reverse=True)


@pytest.mark.parametrize(("kind", "method", "target"), [("poisson", "pld", 2.0),
                                                        ("poisson", "rdp", 2.0),
                                                        ("fixed_size", "rdp", 4.0)])
def test_noise_multiplier_for_is_the_least_that_keeps_the_target(kind, method, target):
    sampling = ClientSampling(kind, 1000, 10)
    z = noise_multiplier_for(target, 200, sampling, 1e-3, method)
    assert PrivacyAccountant(z, sampling, 1e-3, method).epsilon(200) <= target
    assert PrivacyAccountant(z * 0.99, sampling, 1e-3, method).epsilon(200) > target


def test_default_delta_is_one_over_the_population():
    assert default_delta(10_000) == 1e-4
    with pytest.raises(ValueError, match="population >= 2"):
        default_delta(1)


POISSON = ClientSampling("poisson", 1000, 10)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: PrivacyAccountant(0.0, POISSON, 1e-5), "noise_multiplier must be a finite number > 0"),
    (lambda: PrivacyAccountant(-1.0, POISSON, 1e-5), "noise_multiplier must be a finite number"),
    (lambda: PrivacyAccountant(1.0, POISSON, 0.0), r"delta must be in \(0, 1\), got 0.0"),
    (lambda: PrivacyAccountant(1.0, POISSON, 1.0), r"delta must be in \(0, 1\), got 1.0"),
    (lambda: PrivacyAccountant(1.0, POISSON, 1e-5, "gdp"), "method must be 'pld' or 'rdp'"),
    (lambda: PrivacyAccountant(1.0, POISSON, 1e-5).epsilon(-1), "rounds must be >= 0, got -1"),
    (lambda: PrivacyAccountant(1.0, ClientSampling("fixed_size", 1000, 10), 1e-5, "pld"),
     "method='pld' cannot account fixed_size sampling .* use method='rdp'"),
    (lambda: ClientSampling("bernoulli", 1000, 10), "sampling must be 'poisson' or 'fixed_size'"),
    (lambda: ClientSampling("poisson", 1000, 1001),
     r"sample_size must be in \[1, population=1000\]"),
    (lambda: ClientSampling("poisson", 1000, 0), r"q = sample_size / population is in \(0, 1\]"),
    (lambda: noise_multiplier_for(0.0, 100, POISSON, 1e-5), "target_epsilon must be > 0"),
    (lambda: noise_multiplier_for(1.0, 0, POISSON, 1e-5), "rounds must be >= 1 to calibrate"),
    (lambda: noise_multiplier_for(1e4, 10, POISSON, 1e-5, "rdp"),
     "holds even at noise multiplier 0.25 .* the least searched"),
    (lambda: noise_multiplier_for(1e-4, 1000, ClientSampling("poisson", 10, 10), 1e-5, "rdp"),
     "out of reach: even noise multiplier 1000 spends epsilon"),
])
def test_bad_input_fails_in_one_line(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def _privacy(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["privacy", "--rounds", "1000", "--clients-per-round", "20", "--num-clients",
                 "10000", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_privacy_command_prints_the_epsilon_of_a_noise_multiplier(capsys):
    code, out, _ = _privacy(capsys, "--noise-multiplier", "1.0", "--sampling", "poisson")
    assert code == 0
    expected = PrivacyAccountant(1.0, ClientSampling("poisson", 10_000, 20), 1e-4).epsilon(1000)
    assert out.strip() == (f"noise multiplier 1 gives epsilon {expected:.4f} at delta 0.0001 "
                           "after 1000 rounds (each of 10000 clients with probability 0.002, "
                           "poisson sampling, pld)")


def test_privacy_command_prints_a_noise_multiplier_that_keeps_the_target(capsys):
    code, out, _ = _privacy(capsys, "--target-epsilon", "8", "--sampling", "poisson",
                            "--method", "rdp", "--delta", "1e-5")
    assert code == 0
    printed = re.fullmatch(r"noise multiplier (\S+) gives epsilon (\S+) at delta 1e-05 after "
                           r"1000 rounds \(.*, poisson sampling, rdp\)", out.strip())
    assert printed, out
    z, epsilon = map(float, printed.groups())
    sampling = ClientSampling("poisson", 10_000, 20)
    assert z == pytest.approx(noise_multiplier_for(8, 1000, sampling, 1e-5, "rdp"), abs=1e-4)
    assert epsilon == pytest.approx(
        PrivacyAccountant(z, sampling, 1e-5, "rdp").epsilon(1000), abs=1e-4)
    assert epsilon <= 8


@pytest.mark.parametrize(("args", "message"), [
    (["--noise-multiplier", "-1"], "argument --noise-multiplier: expected a number > 0, got '-1'"),
    (["--target-epsilon", "abc"], "argument --target-epsilon: expected a number > 0, got 'abc'"),
    (["--noise-multiplier", "1", "--delta", "2"],
     "argument --delta: expected a number in (0, 1), got '2'"),
    (["--noise-multiplier", "1", "--clients-per-round", "20000"],
     "--clients-per-round 20000 exceeds --num-clients 10000"),
    ([], "one of --target-epsilon and --noise-multiplier is required"),
    (["--noise-multiplier", "1", "--target-epsilon", "8"],
     "argument --target-epsilon: not allowed with argument --noise-multiplier"),
    (["--noise-multiplier", "1", "--sampling", "bernoulli"], "argument --sampling: invalid choice"),
    (["--noise-multiplier", "1", "--method", "pld"], "method='pld' cannot account fixed_size"),
    (["--noise-multiplier", "1", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_privacy_command_fails_in_one_line_naming_the_option(capsys, args, message):
    code, out, err = _privacy(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fltk privacy: error: ")
    assert message in err


def test_privacy_command_imports_no_torch():
    script = ("import sys; from fltoolkit.run.cli import main; "
              "main(['privacy', '--noise-multiplier', '1', '--rounds', '10', "
              "'--clients-per-round', '2', '--num-clients', '100']); "
              "print('torch' in sys.modules, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=True)
    assert done.stdout.splitlines()[-1] == "False False"
