"""The arithmetic of secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al.,
CCS 2020) on plain vectors, so a simulation can charge what the protocol costs.

Each client quantizes its vector into the ring Z_{2^bits} and uploads it plus masks: pairwise
masks that cancel in the sum, and a self mask. The server learns only the sum of the clients
that survived: it removes their self masks and the pairwise masks they share with dropped
clients from secrets the survivors hold Shamir shares of. Here the masks come from torch
generators seeded from public values and Shamir sharing is reduced to its threshold check:
this measures the protocol's bytes, quantization error and failed rounds; it hides nothing.
Every tensor lives on the host.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fltoolkit.strategies.base import RoundFailed

MIN_BITS, MAX_BITS = 8, 62  # up to 62 bits, two ring values add without leaving int64

KEY_BYTES = 32  # an X25519 public key; a client advertises two (encryption, masking)
SHARE_BYTES = 32  # a Shamir share of a 32-byte secret (self-mask seed or masking key)
ENVELOPE_BYTES = 36  # an encrypted message's ids (4 + 4), AES-GCM nonce (12) and tag (16)
ID_BYTES = 4  # the client whose share a survivor sends in the unmasking round


class SecureAggregationFailed(RoundFailed):
    """Too few share holders survived to remove the masks: the round yields no sum."""


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")


def _ring_mask(bits: int) -> int:
    """x & _ring_mask(bits) is x mod 2^bits, for negative int64 x too (two's complement)."""
    return (1 << bits) - 1


@dataclass(frozen=True)
class FixedPoint:
    """Floats <-> ring integers, scaled so that the sum of `clients` vectors never wraps.

    Args:
        bound: the largest |coordinate| a client sends; larger values are clamped to it, so the
            caller clips first (an update clipped to L2 norm C has every |coordinate| <= C).
        clients: the most vectors ever summed: the round's cohort size.
        bits: the ring's width, as in the SecureSumRound the vectors are masked with.
    """

    bound: float
    clients: int
    bits: int = 32

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if not self.bound > 0:
            raise ValueError(f"FixedPoint bound must be > 0, got {self.bound}")
        if self.clients < 1:
            raise ValueError(f"FixedPoint clients must be >= 1, got {self.clients}")
        if self.levels < 1:
            raise ValueError(f"{self.clients} clients leave no levels in a {self.bits}-bit ring")

    @property
    def levels(self) -> int:
        """The largest |quantized value|: `clients` of them sum to at most 2^(bits-1) - 1, the
        largest positive value of the signed ring."""
        return ((1 << (self.bits - 1)) - 1) // self.clients

    @property
    def scale(self) -> float:
        """Ring units per unit of value: `bound` maps to `levels`."""
        return self.levels / self.bound

    def quantize(self, values: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Ring integers (int64 in [0, 2^bits), negatives as 2^bits - |q|) of values clamped to
        [-bound, bound], rounded stochastically: up with probability the fraction, so the sum
        is unbiased and its errors, independent across clients, grow like sqrt(clients)."""
        scaled = values.detach().to("cpu", torch.float64).clamp(-self.bound, self.bound)
        scaled = scaled * self.scale
        floor = scaled.floor()
        rounds_up = torch.rand(scaled.shape, dtype=torch.float64, generator=generator)
        rounded = floor + (rounds_up < scaled - floor)
        # float64 rounding of bound * scale may pass `levels` a little: clamp in int64, as
        # past 2^53 the float64 nearest to `levels` may be above it
        quantized = rounded.to(torch.int64).clamp(-self.levels, self.levels)
        return quantized & _ring_mask(self.bits)

    def dequantize(self, ring_sum: Tensor) -> Tensor:
        """The float64 sum of a ring sum of quantized vectors (values >= 2^(bits-1) negative)."""
        negative = ring_sum >= 1 << (self.bits - 1)
        signed = torch.where(negative, ring_sum - (1 << self.bits), ring_sum)
        return signed.to(torch.float64) / self.scale

    def sum_error_bound(self, clients: int) -> float:
        """Largest |dequantized sum - float sum| per coordinate over `clients` vectors within
        the bound: each rounding moves a value by less than one ring unit, 1/scale, and float64
        rounding adds a relative 2^-50 of the bound, which matters only past ~50 bits."""
        return clients * (1 / self.scale + self.bound * 2.0**-50)


def _generator(*public: object) -> torch.Generator:
    """A generator seeded from public values, the same on every client that derives it."""
    text = ":".join(str(part) for part in public).encode()
    seed = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(seed)


class SecureSumRound:
    """One round's masks, for the cohort of clients that agreed on them.

    Pair (i, j) shares a mask that i adds and j subtracts (i < j), so it cancels in the sum;
    each client also adds a self mask, so that its upload stays uniform even if the server
    later reconstructs the pairwise masks of a client it wrongly believes dropped. A client
    shares its two secrets (self-mask seed, masking key) among its neighbours and itself;
    the server reconstructs one from `share_threshold` = ceil(threshold (degree + 1) / n)
    surviving holders, the threshold's fraction of the cohort (with every pair masking, the
    threshold itself). Survivors are the clients whose masked vectors arrived; they are
    taken to answer the unmasking round too.

    Args:
        cohort: the client ids that advertised keys and exchanged shares.
        seed: the round's seed, from which every mask and the neighbour graph derive.
        threshold: the fewest survivors the server accepts; below it the round fails.
        bits: the ring's width, as in the FixedPoint that quantized the vectors.
        neighbours: None: every pair masks (Bonawitz et al.), O(n^2 d) work in all. An even k:
            each client masks with k/2 clients on each side of a seeded random ring of the
            cohort (SecAgg+, Bell et al.), O(n k d); it needs k of order log n for privacy.
            A k >= n - 1 is the full graph.
    """

    def __init__(self, cohort: Sequence[int], seed: int, *, threshold: int, bits: int = 32,
                 neighbours: int | None = None) -> None:
        _check_bits(bits)
        clients = sorted(cohort)
        if len(set(clients)) != len(clients):
            raise ValueError("the secure-sum cohort repeats a client id")
        size = len(clients)
        if not 1 <= threshold <= size:
            raise ValueError(f"threshold must be in 1..{size} (the cohort size), got {threshold}")
        if neighbours is not None and (neighbours < 2 or neighbours % 2):
            raise ValueError(f"neighbours must be even and >= 2 (k/2 per side), got {neighbours}")
        self.cohort = clients
        self.seed = seed
        self.bits = bits
        self.threshold = threshold
        self.ring: list[int] | None = None  # the SecAgg+ ring order; None: every pair masks
        self.degree = mask_degree(size, neighbours)
        if self.degree < size - 1:
            order = torch.randperm(size, generator=_generator(seed, "graph")).tolist()
            self.ring = [clients[i] for i in order]
        self._position = {client: p for p, client in enumerate(self.ring or clients)}
        self.share_threshold = math.ceil(threshold * (self.degree + 1) / size)

    def neighbours_of(self, client: int) -> list[int]:
        """The clients `client` shares pairwise masks and its secrets' shares with."""
        self._check_member(client)
        if self.ring is None:
            return [other for other in self.cohort if other != client]
        size, position, half = len(self.ring), self._position[client], self.degree // 2
        return [self.ring[(position + offset) % size]
                for offset in range(-half, half + 1) if offset != 0]

    def self_mask(self, client: int, length: int) -> Tensor:
        return self._uniform(length, "self", client)

    def pairwise_mask(self, client: int, other: int, length: int) -> Tensor:
        """The mask both clients derive (in the protocol, from their key agreement)."""
        return self._uniform(length, "pair", min(client, other), max(client, other))

    def mask(self, client: int, quantized: Tensor) -> Tensor:
        """What `client` uploads: its ring vector plus its masks, uniform on the ring whatever
        the vector. A one-time pad: two vectors masked in one round leak their difference."""
        self._check_vector(client, quantized)
        length = quantized.numel()
        masked = (quantized + self.self_mask(client, length)) & _ring_mask(self.bits)
        for other in self.neighbours_of(client):
            self._add_pair(masked, client, other, _pair_sign(client, other))
        return masked

    def unmask_sum(self, masked: dict[int, Tensor]) -> Tensor:
        """The ring sum of the survivors' quantized vectors, survivors being the clients in
        `masked`; dequantize it with the FixedPoint that quantized them.

        Sums the uploads, then removes each survivor's self mask and the pairwise masks
        between survivors and dropped clients, which the server would reconstruct from the
        survivors' shares. Memory O(d): masks are regenerated, one at a time.

        Raises:
            SecureAggregationFailed: fewer than `threshold` survivors, or (with neighbours) a
                secret the sum needs has fewer than `share_threshold` surviving holders.
        """
        for client, vector in masked.items():
            self._check_vector(client, vector)
        lengths = sorted({vector.numel() for vector in masked.values()})
        if len(lengths) > 1:
            raise ValueError(f"masked vectors have different lengths {lengths}")
        self._check_recoverable(set(masked))
        total = torch.zeros(lengths[0], dtype=torch.int64)
        for client, vector in masked.items():
            total.add_(vector).sub_(self.self_mask(client, total.numel()))
            total.bitwise_and_(_ring_mask(self.bits))
        for dropped in (client for client in self.cohort if client not in masked):
            for survivor in self.neighbours_of(dropped):
                if survivor in masked:
                    self._add_pair(total, survivor, dropped, -_pair_sign(survivor, dropped))
        return total

    def _check_recoverable(self, survivors: set[int]) -> None:
        if len(survivors) < self.threshold:
            raise SecureAggregationFailed(f"{len(survivors)} of {len(self.cohort)} clients "
                                          f"survived, below the threshold {self.threshold}")
        if self.ring is None:
            return  # every survivor holds a share of every secret: the count above decides
        for client in self.cohort:
            holders = sum(other in survivors for other in self.neighbours_of(client))
            if client in survivors:
                holders += 1  # its own share of its self-mask seed
            elif holders == 0:
                continue  # no survivor masked with it: its key is not needed
            if holders < self.share_threshold:
                raise SecureAggregationFailed(
                    f"client {client}'s secret has {holders} surviving share holders, below "
                    f"the share threshold {self.share_threshold}")

    def _add_pair(self, total: Tensor, client: int, other: int, sign: int) -> None:
        total.add_(self.pairwise_mask(client, other, total.numel()), alpha=sign)
        total.bitwise_and_(_ring_mask(self.bits))

    def _uniform(self, length: int, *purpose: object) -> Tensor:
        generator = _generator(self.seed, *purpose)
        return torch.randint(0, 1 << self.bits, (length,), generator=generator)

    def _check_member(self, client: int) -> None:
        if client not in self._position:
            raise ValueError(f"client {client} is not in the secure-sum cohort")

    def _check_vector(self, client: int, vector: Tensor) -> None:
        """A cohort member's 1-D int64 vector of ring values: the masks' additions stay in
        int64 only for such values."""
        self._check_member(client)
        if vector.dtype != torch.int64 or vector.dim() != 1:
            raise ValueError(f"client {client}'s vector must be 1-D int64, got {vector.dtype} "
                             f"of shape {tuple(vector.shape)}")
        if vector.numel() and (vector.min() < 0 or vector.max() > _ring_mask(self.bits)):
            raise ValueError(f"client {client}'s vector has values outside [0, 2^{self.bits})")


def _pair_sign(client: int, other: int) -> int:
    """+1 if `client` adds the pair's mask, -1 if it subtracts it."""
    return 1 if client < other else -1


def mask_degree(size: int, neighbours: int | None) -> int:
    """How many others each client of a cohort of `size` masks with: every other client, or
    `neighbours` (SecAgg+) when that is fewer."""
    if neighbours is None or neighbours >= size - 1:
        return size - 1
    return neighbours


def setup_upload_bytes(neighbours: int) -> int:
    """Bytes a client uploads before its masked vector, which a client dropping later has
    already spent: two public keys, then per neighbour one encrypted message holding a share
    of each of its two secrets."""
    return 2 * KEY_BYTES + neighbours * (2 * SHARE_BYTES + ENVELOPE_BYTES)


def upload_bytes(coordinates: int, neighbours: int, bits: int = 32) -> int:
    """Bytes a surviving client uploads in a round, in place of its plain update's:
    setup_upload_bytes, the masked vector at ceil(bits / 8) bytes a coordinate, then in the
    unmasking round one share per neighbour (of its seed if it survived, of its key if it
    dropped) and one of its own seed. `neighbours` is the round's degree (n - 1 if every
    pair masks)."""
    _check_bits(bits)
    unmasking = (neighbours + 1) * (ID_BYTES + SHARE_BYTES)
    return setup_upload_bytes(neighbours) + coordinates * math.ceil(bits / 8) + unmasking
