"""The `privacy` section of an experiment: client-level differential privacy and simulated
secure aggregation around the strategy (fltoolkit.privacy.plan builds them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PrivacyConfig:
    """What protects the clients' uploads beyond local tables.

    Args:
        noise_multiplier: client-level DP (DP-FedAvg): Gaussian noise of std
            noise_multiplier * clip_norm on the sum of clipped updates; unset: no DP.
            `fltk privacy --target-epsilon E ...` prints the value a budget needs.
        clip_norm: bound on the L2 norm of each client's whole update (dense delta and every
            row delta): DP's sensitivity, and secure aggregation's quantization range. With
            `target_quantile` it is the first round's bound.
        row_denominator: what table rows' noised sums are divided by (default
            clients_per_round, DP-FedAvg's fixed denominator). A row is touched by a few
            clients of the cohort, so that moves it far less than FedAvg's touched-only mean;
            a smaller constant keeps the guarantee and moves rows more, noise included.
        target_quantile: adaptive clipping (Andrew et al. 2021): the bound tracks this
            quantile of the clients' update norms (0.5 in the paper); unset: fixed bound.
        clip_learning_rate: adaptive clipping's step on the bound (0.2 in the paper).
        count_noise: adaptive clipping: noise std on the count of unclipped clients
            (default clients_per_round / 20); it takes part of the same budget.
        delta: the DP delta (default 1 / the number of training clients).
        target_epsilon: stop before the round that would take epsilon past this.
        accountant: `pld` (privacy loss distributions: tight; Poisson sampling only), `rdp`
            (Renyi DP: looser; the only one for fixed-size sampling) or `auto`: pld where it
            applies, else rdp. Both from `dp-accounting`; with pld, summary.json also gives
            the rdp epsilon for comparison.
        unaccounted_sampling: run DP with a selection the accountant does not describe
            (Oort, epoch passes, simulated devices that drop clients); the report then
            says the epsilon does not hold.
        secure_aggregation: the server receives only the sum of the cohort's clipped,
            quantized and masked updates (Bonawitz et al. 2017, simulated).
        secagg_bits: bits of the fixed-point ring the updates are quantized to.
        secagg_min_survivors: the fraction of the cohort whose uploads must arrive for the
            masks of the others to be removed (the secret-sharing threshold); fewer, and the
            round fails (counted in `secagg_failed`).
        secagg_neighbours: each client masks with this many others (SecAgg+, Bell et al.
            2020); unset: with every other client of the cohort.
    """

    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    row_denominator: float | None = None
    target_quantile: float | None = None
    clip_learning_rate: float = 0.2
    count_noise: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    accountant: Literal["auto", "pld", "rdp"] = "auto"
    unaccounted_sampling: bool = False
    secure_aggregation: bool = False
    secagg_bits: int = 32
    secagg_min_survivors: float = 0.5
    secagg_neighbours: int | None = None

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise ValueError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if not 0 < self.secagg_min_survivors <= 1:
            raise ValueError("privacy.secagg_min_survivors must be in (0, 1], got "
                             f"{self.secagg_min_survivors}")
        if not 8 <= self.secagg_bits <= 62:
            raise ValueError(f"privacy.secagg_bits must be in 8..62, got {self.secagg_bits}")
        neighbours = self.secagg_neighbours
        if neighbours is not None and (neighbours < 2 or neighbours % 2):
            raise ValueError("privacy.secagg_neighbours must be even and >= 2 (half on each side "
                             f"of the masking ring), got {neighbours}")
        if self.target_epsilon is not None and self.noise_multiplier is None:
            raise ValueError("privacy.target_epsilon needs privacy.noise_multiplier (DP on)")
        dp_only = {"target_quantile": self.target_quantile, "count_noise": self.count_noise,
                   "delta": self.delta, "row_denominator": self.row_denominator}
        given = [key for key, value in dp_only.items() if value is not None]
        if given and self.noise_multiplier is None:
            raise ValueError(f"privacy.{given[0]} is a DP setting: set privacy.noise_multiplier")

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None

    @property
    def enabled(self) -> bool:
        return self.dp or self.secure_aggregation
