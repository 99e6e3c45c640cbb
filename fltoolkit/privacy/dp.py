"""Client-level differential privacy around an averaging strategy: DP-FedAvg (McMahan et al.,
ICLR 2018, "Learning Differentially Private Recurrent Language Models") with the adaptive
clipping of Andrew et al., NeurIPS 2021, "Differentially Private Learning with Adaptive
Clipping".

Each client's whole update (dense delta and every row delta, one vector) is clipped to L2
norm C and counts with weight 1, so one client changes the round's sum by at most C; the
server adds Gaussian noise of std z * C to the sum and divides by the expected cohort size,
a constant, because a data-dependent denominator would itself leak. The noise covers every
row of every shared table, touched or not: noise on the touched rows only would publish
which rows the cohort touched. Local tables never leave the clients and get none.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fltoolkit.strategies.base import RowSum, ServerModel, StrategyWrapper
from fltoolkit.strategies.sums import Contribution, SumStrategy, UpdateSum, require_sums
from fltoolkit.training.updates import ClientUpdate, squared_norms

NOISE_STREAM = 0xD1FF  # keeps the noise's seeds apart from other per-round randomness
UNCLIPPED = "unclipped"  # the extra scalar counting the clients within the clip norm


class DifferentialPrivacy(StrategyWrapper, SumStrategy):
    """DP-FedAvg around `strategy` (FedAvg, FedAvgM, FedAdam, ...: any SumStrategy).

    Args:
        strategy: the averaging strategy that steps with the noised mean.
        noise_multiplier: z, the noise std over the clip norm (the accountant's parameter);
            0 clips and averages with the fixed denominator, without noise (no guarantee).
        clip_norm: C, the bound on each client's update norm (the first round's with
            adaptive clipping).
        expected_clients: the fixed denominator of the mean: the expected cohort size.
        row_denominator: the fixed denominator of table rows' means (default
            expected_clients). A row is touched by a few of the cohort, so dividing its sum by
            the cohort size moves it much less than FedAvg's touched-only mean; any constant
            keeps the guarantee (it does not depend on the data), at the price of the noise
            it divides less. Read through the rows' weights, so by the inner strategy's
            default `sparse_weighting: touched` (`global` divides by expected_clients).
        target_quantile: adaptive clipping: the fraction of clients whose update norm C
            should bound (the paper uses 0.5); None keeps C fixed.
        clip_learning_rate: adaptive clipping's geometric step eta_C (0.2 in the paper).
        count_noise: adaptive clipping: std sigma_b of the noise on the count of unclipped
            clients (default expected_clients / 20, as in the paper). Part of the privacy
            budget goes to that count, so the updates get noise multiplier
            (z^-2 - (2 sigma_b)^-2)^-1/2 and the whole release keeps multiplier z.
    """

    def __init__(self, strategy: SumStrategy, *, noise_multiplier: float, clip_norm: float,
                 expected_clients: float, row_denominator: float | None = None,
                 target_quantile: float | None = None,
                 clip_learning_rate: float = 0.2, count_noise: float | None = None) -> None:
        require_sums(strategy, "differential privacy",
                     "it steps with a noised sum and never sees individual updates")
        super().__init__(strategy)
        row_denominator = row_denominator or expected_clients
        for name, value in (("clip_norm", clip_norm), ("expected_clients", expected_clients),
                            ("row_denominator", row_denominator)):
            if not value > 0:
                raise ValueError(f"privacy.{name} must be > 0, got {value}")
        if not noise_multiplier >= 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0, got {noise_multiplier}")
        if target_quantile is not None and not 0 < target_quantile < 1:
            raise ValueError(f"privacy.target_quantile must be in (0, 1), got {target_quantile}")
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.expected_clients, self.row_denominator = expected_clients, row_denominator
        self.target_quantile, self.clip_learning_rate = target_quantile, clip_learning_rate
        self.count_noise = (expected_clients / 20 if count_noise is None else count_noise)
        if self.adaptive and not 2 * self.count_noise > noise_multiplier:
            raise ValueError(
                f"privacy.count_noise ({self.count_noise}) must exceed noise_multiplier / 2 "
                f"({noise_multiplier / 2}): the count's noise is part of the same budget")
        self.seed = 0

    @property
    def moves_every_row(self) -> bool:  # type: ignore[override]
        return self.noise_multiplier > 0  # the noise

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    def update_noise_multiplier(self) -> float:
        """z for the updates: all of z, or what the noised count leaves of it."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.count_noise) ** -2) ** -0.5

    def own_hyperparameters(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "expected_clients": self.expected_clients,
                "row_denominator": self.row_denominator,
                "target_quantile": self.target_quantile,
                "clip_learning_rate": self.clip_learning_rate, "count_noise": self.count_noise}

    def start_round(self, round_index: int, cohort: list[int], seed: int) -> None:
        self.seed = int(np.random.SeedSequence([seed, round_index, NOISE_STREAM])
                        .generate_state(1)[0])
        super().start_round(round_index, cohort, seed)

    def norm_bound(self) -> float:
        return self.clip_norm

    def extra_names(self) -> list[str]:
        return [UNCLIPPED]

    def contributions(self, updates: list[ClientUpdate]) -> list[Contribution]:
        """Each client's update clipped to C (as a scale: the sum takes factor * delta) with
        weight 1, and whether it was within C (adaptive clipping's count)."""
        norms = squared_norms(updates).sqrt().tolist()
        return [Contribution(update, 1.0, min(1.0, self.clip_norm / norm) if norm > 0 else 1.0,
                             {UNCLIPPED: float(norm <= self.clip_norm)})
                for update, norm in zip(updates, norms, strict=True)]

    def apply_sum(self, total: UpdateSum, server: ServerModel) -> None:
        """Noise on the sum, over the dense vector and every row of every shared table, then
        the inner strategy's step with the fixed denominator; then adapt C."""
        generator = torch.Generator(device=server.dense.device).manual_seed(self.seed)
        std = self.update_noise_multiplier() * self.clip_norm
        noised = (self._noised(total, server, std, generator) if std > 0 else
                  UpdateSum(total.dense, self.expected_clients,
                            {name: rows._replace(weights=torch.full_like(rows.weights,
                                                                          self.row_denominator))
                             for name, rows in total.rows.items()}, total.clients))
        self.strategy.apply_sum(noised, server)
        if self.adaptive:
            self._adapt_clip_norm(total.extras.get(UNCLIPPED, 0.0), generator)

    def _noised(self, total: UpdateSum, server: ServerModel, std: float,
                generator: torch.Generator) -> UpdateSum:
        """The sum plus N(0, std^2) on the dense vector and every row of every shared table,
        every row weighted by the rows' fixed denominator."""
        dense = total.dense + _gaussian(total.dense.shape, std, generator, total.dense.device)
        rows = {}
        for name, table in server.tables.items():
            noised = _gaussian(table.shape, std, generator, table.device)
            if name in total.rows:
                noised.index_add_(0, total.rows[name].ids, total.rows[name].values)
            every = torch.arange(table.shape[0], device=table.device)
            rows[name] = RowSum(every, noised, noised.new_full((table.shape[0],),
                                                               self.row_denominator))
        return UpdateSum(dense, self.expected_clients, rows, total.clients)

    def _adapt_clip_norm(self, unclipped: float, generator: torch.Generator) -> None:
        """C <- C * exp(-eta_C * (b - gamma)), b the noised fraction of unclipped clients:
        C shrinks while more than the target quantile fit under it, and grows otherwise."""
        noise = float(torch.randn((), generator=generator, device=generator.device))
        fraction = (unclipped + self.count_noise * noise) / self.expected_clients
        self.clip_norm *= math.exp(-self.clip_learning_rate * (fraction - self.target_quantile))

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.clip_norm = state["clip_norm"]


def _gaussian(shape: torch.Size, std: float, generator: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """N(0, std^2) drawn in place into one new tensor: at 1M-row tables a separate multiply
    by std cost a third of the draw again."""
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
