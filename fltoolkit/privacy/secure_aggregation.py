"""Secure aggregation around an averaging strategy (Bonawitz et al., CCS 2017, simulated): the
server learns the sum of the cohort's updates and nothing about any one of them.

Every client lays its contribution out on one vector shared by the round: its weighted dense
delta, its weight, its extra scalars, then for every table the round's union of touched rows
(its own rows' deltas in place, zeros elsewhere) and a weight column marking the rows it
touched, so the sum gives FedAvg's touched-only denominators too. The vector is clipped,
quantized to a fixed-point ring and masked (fltoolkit.privacy.secure_sum); the server adds
the masked vectors, removes the masks and hands the inner strategy an `UpdateSum`.

What it does not hide: the union of touched rows is laid out in the clear. Computing it
privately (a private set union) is out of scope; the server learns which rows the cohort
touched, not who touched them. Each client's sample count, training loss and whether it
uploaded remain visible, as in the protocol.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fltoolkit.privacy.secure_sum import FixedPoint, SecureSumRound, mask_degree, upload_bytes
from fltoolkit.strategies.base import RowSum, ServerModel, StrategyWrapper, Uploads, check_updates
from fltoolkit.strategies.sums import Contribution, SumStrategy, UpdateSum, require_sums
from fltoolkit.training.updates import ClientUpdate, PlannedUploads, squared_norms, table_ids

MASK_STREAM = 0x5EC0  # keeps the masks' seeds apart from other per-round randomness


class SumLayout:
    """Where each part of a contribution sits on the round's vector.

    Args:
        dense_size: length of the dense delta.
        extras: the names of the extra scalars, in vector order.
        union: table -> the sorted row ids any contribution touched.
        widths: table -> embedding width.
    """

    def __init__(self, dense_size: int, extras: list[str], union: dict[str, Tensor],
                 widths: dict[str, int]) -> None:
        self.dense_size, self.extras, self.union, self.widths = dense_size, extras, union, widths
        self.offsets: dict[str, tuple[int, int]] = {}  # table -> (values, weights) offsets
        position = dense_size + 1 + len(extras)
        for name, ids in union.items():
            self.offsets[name] = (position, position + ids.numel() * widths[name])
            position += ids.numel() * (widths[name] + 1)
        self.length = position

    @classmethod
    def of(cls, updates: list[ClientUpdate], extras: list[str]) -> SumLayout:
        """The layout of a round's updates, with the inner strategy's extra scalars."""
        widths = {}
        for update in updates:
            for name in update.tables:
                widths.setdefault(name, update.tables[name].values.shape[1])
        union = {name: torch.unique(table_ids(updates, name)).cpu() for name in sorted(widths)}
        return cls(updates[0].dense.numel(), extras, union, widths)

    def rows(self) -> int:
        return sum(ids.numel() for ids in self.union.values())

    def vector(self, contribution: Contribution) -> Tensor:
        """The contribution on the round's vector (float64)."""
        update, weight = contribution.update, contribution.weight
        factor = weight * contribution.scale
        vector = torch.zeros(self.length, dtype=torch.float64)
        vector[:self.dense_size] = update.dense.detach().cpu().double() * factor
        after_dense = self.dense_size
        vector[after_dense] = weight
        for i, key in enumerate(self.extras):
            vector[after_dense + 1 + i] = contribution.extras.get(key, 0.0)
        for name, (values_at, weights_at) in self.offsets.items():
            if name not in update.tables:
                continue
            rows = update.tables[name]
            union = self.union[name]
            where = torch.searchsorted(union, rows.ids.cpu())
            block = vector[values_at:weights_at].view(union.numel(), self.widths[name])
            block[where] = rows.values.detach().cpu().double() * factor
            vector[weights_at:weights_at + union.numel()][where] = weight
        return vector

    def split(self, vector: Tensor, clients: int, device: torch.device) -> UpdateSum:
        """The UpdateSum that a summed vector holds."""
        def part(start: int, stop: int) -> Tensor:
            return vector[start:stop].to(device, torch.float32)

        after_dense = self.dense_size
        rows = {}
        for name, (values_at, weights_at) in self.offsets.items():
            count = self.union[name].numel()
            rows[name] = RowSum(self.union[name].to(device),
                                part(values_at, weights_at).view(count, self.widths[name]),
                                part(weights_at, weights_at + count))
        return UpdateSum(part(0, after_dense), float(vector[after_dense]), rows, clients,
                         {key: float(vector[after_dense + 1 + i])
                          for i, key in enumerate(self.extras)})


class SecureAggregation(StrategyWrapper, SumStrategy):
    """The inner strategy receives only the unmasked sum of the round's contributions.

    Args:
        strategy: the averaging strategy (or DP around one) that steps with the sum.
        clip_norm: each client's update is clipped to this L2 norm: the masked vectors live
            in a bounded ring, so their coordinates need a bound. An inner strategy that
            bounds its contributions itself (DP, with its possibly adaptive clip norm) sets
            the bound instead.
        bits: the ring's width.
        min_survivors: the fraction of the cohort whose uploads must arrive (the secret
            sharing threshold); fewer, and the round fails.
        neighbours: each client masks with this many others (even; SecAgg+); None: with
            every other client of the cohort.
    """

    def __init__(self, strategy: SumStrategy, *, clip_norm: float, bits: int = 32,
                 min_survivors: float = 0.5, neighbours: int | None = None) -> None:
        require_sums(strategy, "secure aggregation",
                     "the server only ever holds the sum of the updates")
        super().__init__(strategy)
        if not clip_norm > 0:
            raise ValueError(f"secure aggregation clip_norm must be > 0, got {clip_norm}")
        if not 0 < min_survivors <= 1:
            raise ValueError(f"secure aggregation min_survivors must be in (0, 1], got "
                             f"{min_survivors}")
        self.clip_norm, self.bits = clip_norm, bits
        self.min_survivors, self.neighbours = min_survivors, neighbours
        self.cohort: list[int] = []
        self.seed = 0

    def own_hyperparameters(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "bits": self.bits,
                "min_survivors": self.min_survivors, "neighbours": self.neighbours}

    def start_round(self, round_index: int, cohort: list[int], seed: int) -> None:
        """The cohort advertises its keys and shares its secrets: it fixes the masks."""
        self.cohort = list(cohort)
        self.seed = int(np.random.SeedSequence([seed, round_index, MASK_STREAM])
                        .generate_state(1)[0])
        super().start_round(round_index, cohort, seed)

    def contributions(self, updates: list[ClientUpdate]) -> list[Contribution]:
        """The inner strategy's contributions, each update's deltas clipped to the bound."""
        inner = self.strategy.contributions(updates)
        bound = self.norm_bound()
        norms = squared_norms(updates).sqrt().tolist()
        return [c._replace(scale=bound / norm) if c.scale * norm > bound else c
                for c, norm in zip(inner, norms, strict=True)]

    def norm_bound(self) -> float:
        return self.strategy.norm_bound() or self.clip_norm

    def extra_names(self) -> list[str]:
        return self.strategy.extra_names()

    def aggregate(self, updates: list[ClientUpdate], server: ServerModel) -> None:
        check_updates(updates, server)
        contributions = self.contributions(updates)
        layout = SumLayout.of(updates, self.extra_names())
        protocol = self._protocol()
        ring = self._ring(contributions)
        uploads = {}
        for contribution in contributions:  # client side: quantize and mask
            client = contribution.update.client
            rounding = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, client]).generate_state(1)[0]))
            quantized = ring.quantize(layout.vector(contribution), rounding)
            uploads[client] = protocol.mask(client, quantized)
        self.apply_sum(self.server_sum(uploads, protocol, ring, layout, server.dense.device),
                       server)

    def apply_sum(self, total: UpdateSum, server: ServerModel) -> None:
        self.strategy.apply_sum(total, server)

    def server_sum(self, uploads: dict[int, Tensor], protocol: SecureSumRound,
                   ring: FixedPoint, layout: SumLayout, device: torch.device) -> UpdateSum:
        """The server's side: the masked vectors in, their sum out (or SecureAggregationFailed
        when too few arrived). Nothing else the clients computed reaches it."""
        summed = ring.dequantize(protocol.unmask_sum(uploads))
        return layout.split(summed, len(uploads), device)

    def uploads(self, updates: list[ClientUpdate]) -> Uploads:
        """Every arriving client sends one masked vector over the round's union of rows and
        the protocol's keys and shares, in place of its update."""
        if not updates:
            return Uploads(0, 0)
        layout = SumLayout.of(updates, self.extra_names())
        per_client = upload_bytes(layout.length, mask_degree(len(self.cohort), self.neighbours),
                                  self.bits)
        return Uploads(per_client * len(updates), layout.rows())

    def planned_upload_bytes(self, planned: PlannedUploads) -> np.ndarray:
        """What `uploads` counts, priced at planning time: the masked vector is laid out
        before anyone trains, so over the planned cohort's union of rows, with masks among
        the planned cohort. With over-commitment that is every selected client while the
        protocol then runs among the kept ones, so the clock charges at most this much more
        than rounds.csv counts."""
        layout = SumLayout(planned.dense_size, self.extra_names(), planned.union(),
                           planned.widths)
        per_client = upload_bytes(layout.length, mask_degree(planned.clients, self.neighbours),
                                  self.bits)
        return np.full(planned.clients, per_client, dtype=np.int64)

    def _protocol(self) -> SecureSumRound:
        threshold = max(1, math.ceil(self.min_survivors * len(self.cohort)))
        return SecureSumRound(self.cohort, self.seed, threshold=threshold, bits=self.bits,
                              neighbours=self.neighbours)

    def _ring(self, contributions: list[Contribution]) -> FixedPoint:
        """A ring whose range covers every coordinate: deltas |w s delta_i| <= w C, weights
        w, extras in [-1, 1]; the largest weight is announced to fix it (a deployment would
        use a public cap on samples per client)."""
        largest = max(c.weight for c in contributions)
        return FixedPoint(max(largest, 1.0) * max(self.norm_bound(), 1.0), len(self.cohort),
                          self.bits)
