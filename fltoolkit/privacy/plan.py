"""A run's privacy mechanisms, built from the `privacy` section and checked against the rest
of the configuration: the wrapped strategy, the accountant, and the statement of what the
server learns (summary.json, the report)."""

from __future__ import annotations

import logging
import math
from functools import cached_property
from typing import Any

from fltoolkit.privacy.accountant import ClientSampling, PrivacyAccountant, default_delta
from fltoolkit.privacy.config import PrivacyConfig
from fltoolkit.privacy.dp import DifferentialPrivacy
from fltoolkit.privacy.secure_aggregation import SecureAggregation
from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.selection import ClientSelector, PoissonSelector, UniformSelector
from fltoolkit.strategies import Strategy

log = logging.getLogger("fltk")


class PrivacyPlan:
    """The strategy as the clients' uploads reach it, and what the run can claim.

    Args:
        config: the privacy section.
        strategy: the configured strategy (wrapped here when privacy is on).
        selector: the client selector (which sampling the accountant may assume).
        num_clients: training clients (the population the accountant samples from).
        clients_per_round: the cohort size, expected with Poisson sampling.
        rounds: the rounds the run is configured for.
        devices: simulated devices are on (they drop and filter clients after sampling).
        reject_norm_ratio: the gate's norm-outlier check (it reads individual updates).
        sharded: the server's tables are sharded across ranks.
    """

    def __init__(self, config: PrivacyConfig, strategy: Strategy, *, selector: ClientSelector,
                 num_clients: int, clients_per_round: int, rounds: int, devices: bool,
                 reject_norm_ratio: float | None, sharded: bool) -> None:
        self.config = config
        self.sampling: ClientSampling | None = None
        self.why_not: str | None = None
        self.accountant: PrivacyAccountant | None = None
        self.delta: float | None = None
        self.dp: DifferentialPrivacy | None = None
        self.rounds = rounds
        if config.enabled:
            _check_combinations(config, reject_norm_ratio, sharded)
        try:
            self.strategy = self._wrapped(strategy, selector, num_clients, clients_per_round,
                                          devices)
            if config.target_epsilon is not None and self.epsilon(1) > config.target_epsilon:
                raise ConfigError(f"privacy.target_epsilon {config.target_epsilon} is below the "
                                  f"epsilon of a single round ({self.epsilon(1):.3f}): raise it "
                                  "or privacy.noise_multiplier")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @classmethod
    def for_run(cls, config: PrivacyConfig, federated: FederatedConfig, num_clients: int,
                devices: bool, sharded: bool) -> PrivacyPlan:
        """The plan of a run's `federated` section (its strategy, selector, cohort, rounds and
        gate)."""
        return cls(config, federated.strategy, selector=federated.selector,
                   num_clients=num_clients, clients_per_round=federated.clients_per_round,
                   rounds=federated.rounds, devices=devices,
                   reject_norm_ratio=federated.reject_norm_ratio, sharded=sharded)

    def _wrapped(self, strategy: Strategy, selector: ClientSelector, num_clients: int,
                 clients_per_round: int, devices: bool) -> Strategy:
        """`strategy` inside DP (if on) inside secure aggregation (if on)."""
        config = self.config
        if config.dp:
            self.delta = config.delta or default_delta(num_clients)
            if config.noise_multiplier > 0:
                self._check_sampling(selector, devices, num_clients, clients_per_round)
                self.accountant = self._accountant(num_clients, clients_per_round)
            elif config.target_epsilon is not None:
                raise ConfigError("privacy.target_epsilon needs privacy.noise_multiplier > 0: "
                                  "without noise epsilon is infinite")
            strategy = self.dp = DifferentialPrivacy(
                strategy, noise_multiplier=config.noise_multiplier, clip_norm=config.clip_norm,
                expected_clients=clients_per_round, row_denominator=config.row_denominator,
                target_quantile=config.target_quantile,
                clip_learning_rate=config.clip_learning_rate, count_noise=config.count_noise)
        if config.secure_aggregation:
            strategy = SecureAggregation(
                strategy, clip_norm=config.clip_norm, bits=config.secagg_bits,
                min_survivors=config.secagg_min_survivors, neighbours=config.secagg_neighbours)
        return strategy

    def _check_sampling(self, selector: ClientSelector, devices: bool, num_clients: int,
                        clients_per_round: int) -> None:
        """Refuse a selection the accountant cannot describe, unless told to run anyway."""
        config = self.config
        self.sampling, self.why_not = _sampling(selector, devices, num_clients,
                                                clients_per_round)
        if self.why_not and not config.unaccounted_sampling:
            raise ConfigError(f"privacy: {self.why_not}, so the accountant's epsilon would not "
                              "hold; set privacy.unaccounted_sampling true to run anyway (the "
                              "report then says so)")
        if self.why_not:
            log.warning("privacy: %s; epsilon is reported but does not hold", self.why_not)

    def _accountant(self, num_clients: int, clients_per_round: int) -> PrivacyAccountant:
        """The accountant of the sampling (fixed-size if none holds: reported, not claimed)."""
        config = self.config
        sampling = self.sampling or ClientSampling(
            "fixed_size", population=num_clients, sample_size=clients_per_round)
        method = config.accountant
        if method == "auto":
            method = "pld" if sampling.kind == "poisson" else "rdp"
        return PrivacyAccountant(config.noise_multiplier, sampling, self.delta, method=method)

    def epsilon(self, rounds: int) -> float | None:
        """Epsilon at delta after `rounds` rounds: None without DP, inf without noise."""
        if not self.config.dp:
            return None
        return math.inf if self.accountant is None else self.accountant.epsilon(rounds)

    def allows(self, round_index: int) -> bool:
        """Whether round `round_index` keeps epsilon within privacy.target_epsilon."""
        return round_index <= self.last_allowed_round

    @cached_property
    def last_allowed_round(self) -> int:
        """The last round whose epsilon is <= privacy.target_epsilon (epsilon grows with the
        rounds), found by bisection once, when the run first asks: an accounting costs up to
        a second, too much for every round, and a plan built only to check the settings
        (before the run directory exists) never asks."""
        target, rounds = self.config.target_epsilon, self.rounds
        if target is None or self.epsilon(rounds) <= target:
            return rounds
        within, beyond = 1, rounds + 1
        while beyond - within > 1:
            middle = (within + beyond) // 2
            within, beyond = (middle, beyond) if self.epsilon(middle) <= target else (within,
                                                                                      middle)
        return within

    def statement(self, uploaded: list[str], local: list[str], rounds: int) -> dict[str, Any]:
        """What the server learns from the clients, for summary.json and the report."""
        secure = self.config.secure_aggregation
        statement: dict[str, Any] = {
            "server_receives": ("only the sum of the cohort's clipped, quantized updates "
                                "(secure aggregation)") if secure else "each client's update",
            "row_ids": ("the union of the cohort's touched rows per table (computed in the "
                        "clear: a private set union is out of scope)") if secure
            else "each client's touched row ids per table",
            "per_client_in_clear": ["sample count", "training loss", "whether it uploaded"],
            "tables_uploaded": uploaded,
            "tables_local": local,
            "local_tables_stay_local": True,
        }
        if self.config.dp:
            statement["differential_privacy"] = {
                "epsilon": self.epsilon(rounds), "delta": self.delta,
                "noise_multiplier": self.config.noise_multiplier,
                "clip_norm": self.config.clip_norm,
                "last_clip_norm": self.dp.clip_norm,
                "adaptive_clipping": self.config.target_quantile is not None,
                "accountant": self.accountant.method if self.accountant else None,
                **self._rdp_for_comparison(rounds),
                "sampling": ({"kind": self.sampling.kind, "rate": self.sampling.rate}
                             if self.sampling else None),
                "guarantee_holds": self.why_not is None and self.accountant is not None,
                **({"why_not": self.why_not} if self.why_not else {}),
            }
        return statement

    def _rdp_for_comparison(self, rounds: int) -> dict[str, float]:
        """The RDP epsilon beside the PLD one (the issue's comparison); {} otherwise."""
        accountant = self.accountant
        if accountant is None or accountant.method != "pld":
            return {}
        rdp = PrivacyAccountant(accountant.noise_multiplier, accountant.sampling,
                                accountant.delta, method="rdp")
        return {"epsilon_rdp": rdp.epsilon(rounds)}


def _check_combinations(config: PrivacyConfig, reject_norm_ratio: float | None,
                        sharded: bool) -> None:
    """One line for each combination privacy cannot run with."""
    if sharded:
        raise ConfigError("privacy and federated.sharding exclude each other so far: noise and "
                          "masks are drawn over whole tables")
    if config.secure_aggregation and reject_norm_ratio is not None:
        raise ConfigError("federated.reject_norm_ratio and privacy.secure_aggregation exclude "
                          "each other: the norm check reads individual updates, which secure "
                          "aggregation hides")


def _sampling(selector: ClientSelector, devices: bool, num_clients: int,
              clients_per_round: int) -> tuple[ClientSampling | None, str | None]:
    """The sampling the accountant can assume of `selector`, or why none holds."""
    if devices:
        return None, ("simulated devices choose among the online clients and drop some after "
                      "selection")
    if isinstance(selector, PoissonSelector):
        return ClientSampling("poisson", population=num_clients,
                              sample_size=clients_per_round), None
    if isinstance(selector, UniformSelector):
        return ClientSampling("fixed_size", population=num_clients,
                              sample_size=clients_per_round), None
    return None, (f"{type(selector).__name__} does not sample clients at random "
                  "(use PoissonSelector or UniformSelector)")
