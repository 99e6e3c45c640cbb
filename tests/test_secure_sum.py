"""Simulated secure aggregation: fixed-point quantization, masks that cancel or are removed,
dropouts, the threshold, the uniformity of what a client uploads, and the byte formula."""

from __future__ import annotations

import math

import pytest
import torch

from fltoolkit.privacy.secure_sum import (
    FixedPoint,
    SecureAggregationFailed,
    SecureSumRound,
    setup_upload_bytes,
    upload_bytes,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ring_sum(vectors: list[torch.Tensor], bits: int) -> torch.Tensor:
    """The plain sum mod 2^bits, one vector at a time so no int64 sum overflows."""
    total = torch.zeros_like(vectors[0])
    for vector in vectors:
        total = (total + vector) & ((1 << bits) - 1)
    return total


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor, dof: int) -> float:
    """P-value of Pearson's chi-square statistic: the regularized upper incomplete gamma."""
    statistic = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   statistic / 2).item()


def _uniformity_p(values: torch.Tensor, bits: int) -> float:
    """P-value that ring values fall evenly in 16 equal buckets of the ring."""
    counts = torch.bincount(values >> (bits - 4), minlength=16).to(torch.float64)
    return _chi_square_p(counts, torch.full((16,), values.numel() / 16, dtype=torch.float64), 15)


def _independence_p(first: torch.Tensor, second: torch.Tensor, bits: int) -> float:
    """P-value that the 4 ring quarters of two vectors are independent, coordinate by coordinate."""
    cells = torch.bincount((first >> (bits - 2)) * 4 + (second >> (bits - 2)), minlength=16)
    table = cells.reshape(4, 4).to(torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return _chi_square_p(table, expected, 9)


# --- fixed point ---------------------------------------------------------------------------


def test_scale_leaves_room_for_every_clients_largest_value():
    point = FixedPoint(bound=2.0, clients=10)
    assert point.levels == (2**31 - 1) // 10 == 214_748_364
    assert point.scale == 107_374_182.0
    assert point.sum_error_bound(1) == pytest.approx(1 / 107_374_182.0 + 2.0 * 2.0**-50)


def test_round_trip_is_within_one_ring_unit():
    point = FixedPoint(bound=2.0, clients=10, bits=16)  # coarse: 1638 levels
    values = torch.linspace(-2.0, 2.0, 10_001, dtype=torch.float64)
    quantized = point.quantize(values, _generator(0))
    assert quantized.dtype == torch.int64
    assert 0 <= quantized.min() and quantized.max() < 2**16
    error = (point.dequantize(quantized) - values).abs().max().item()
    assert 0 < error <= point.sum_error_bound(1)
    assert point.sum_error_bound(1) == pytest.approx(2.0 / 3276)  # 1/scale, scale = 3276/2


def test_stochastic_rounding_is_unbiased():
    point = FixedPoint(bound=1.0, clients=1, bits=16)
    value = 5.25 / point.scale  # a quarter of the way from level 5 to level 6
    quantized = point.quantize(torch.full((40_000,), value), _generator(1))
    assert set(quantized.unique().tolist()) == {5, 6}
    # 6 with probability 1/4: the mean's standard deviation is sqrt(3/16 / 40000) = 0.0022
    assert quantized.double().mean().item() == pytest.approx(5.25, abs=0.01)


def test_negative_values_wrap_to_the_top_of_the_ring_and_come_back():
    point = FixedPoint(bound=127.0, clients=1, bits=8)  # 127 levels, scale 1
    quantized = point.quantize(torch.tensor([-127.0, -63.0, 0.0, 127.0]), _generator(0))
    assert quantized.tolist() == [256 - 127, 256 - 63, 0, 127]
    assert point.dequantize(quantized).tolist() == [-127.0, -63.0, 0.0, 127.0]


def test_sum_of_positive_and_negative_values_is_within_the_stated_error():
    point = FixedPoint(bound=0.5, clients=7, bits=20)
    values = [torch.rand(5000, generator=_generator(c), dtype=torch.float64) - 0.5
              for c in range(7)]
    ring_sum = _ring_sum([point.quantize(v, _generator(100 + c)) for c, v in enumerate(values)],
                         point.bits)
    error = (point.dequantize(ring_sum) - torch.stack(values).sum(0)).abs().max().item()
    assert error <= point.sum_error_bound(7) == pytest.approx(7 * 0.5 / 74_898, rel=1e-6)
    total = point.dequantize(ring_sum)
    assert total.min() < -1.0 and total.max() > 1.0  # both signs came through the ring


@pytest.mark.parametrize("bits", [8, 32, 62])
@pytest.mark.parametrize("clients", [1, 7, 100])
def test_no_wrap_when_every_client_sends_plus_or_minus_the_bound(bits: int, clients: int):
    point = FixedPoint(bound=3.0, clients=clients, bits=bits)
    for sign in (1.0, -1.0):
        vector = point.quantize(torch.full((4,), sign * 3.0), _generator(clients))
        total = point.dequantize(_ring_sum([vector] * clients, bits))
        assert (total - sign * 3.0 * clients).abs().max() <= point.sum_error_bound(clients)


def test_values_beyond_the_bound_are_clamped():
    point = FixedPoint(bound=1.0, clients=4)
    quantized = point.quantize(torch.tensor([5.0, -1e9, 0.25]), _generator(0))
    assert point.dequantize(quantized).tolist() == pytest.approx([1.0, -1.0, 0.25], abs=1e-8)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"bound": 1.0, "clients": 2, "bits": 7}, "bits must be in 8..62, got 7"),
    ({"bound": 1.0, "clients": 2, "bits": 63}, "bits must be in 8..62, got 63"),
    ({"bound": 0.0, "clients": 2}, "bound must be > 0"),
    ({"bound": 1.0, "clients": 0}, "clients must be >= 1"),
    ({"bound": 1.0, "clients": 128, "bits": 8}, "128 clients leave no levels in a 8-bit ring"),
])
def test_fixed_point_rejects_bad_settings(arguments: dict, message: str):
    with pytest.raises(ValueError, match=message):
        FixedPoint(**arguments)


# --- masking and unmasking -----------------------------------------------------------------


def _cohort_vectors(point: FixedPoint, clients: int, length: int
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each client's floats within the bound, and their quantized ring vectors."""
    values = [(torch.rand(length, generator=_generator(c), dtype=torch.float64) * 2 - 1)
              * point.bound for c in range(clients)]
    return values, [point.quantize(v, _generator(1000 + c)) for c, v in enumerate(values)]


@pytest.mark.parametrize("bits", [32, 62])
@pytest.mark.parametrize("neighbours", [None, 4])
@pytest.mark.parametrize("dropped", [[], [3], [3, 11]])
def test_unmasked_sum_is_the_exact_ring_sum_of_the_survivors(bits: int, neighbours: int | None,
                                                             dropped: list[int]):
    clients, length = 16, 3000
    point = FixedPoint(bound=0.1, clients=clients, bits=bits)
    values, quantized = _cohort_vectors(point, clients, length)
    round_ = SecureSumRound(range(clients), seed=42, threshold=8, bits=bits,
                            neighbours=neighbours)
    survivors = [c for c in range(clients) if c not in dropped]
    masked = {c: round_.mask(c, quantized[c]) for c in survivors}
    ring_sum = round_.unmask_sum(masked)
    assert torch.equal(ring_sum, _ring_sum([quantized[c] for c in survivors], bits))
    float_sum = torch.stack([values[c] for c in survivors]).sum(0)
    error = (point.dequantize(ring_sum) - float_sum).abs().max().item()
    assert error <= point.sum_error_bound(len(survivors))
    # and the masks did hide each vector: no upload equals its input
    assert all(not torch.equal(masked[c], quantized[c]) for c in survivors)


def test_exactly_threshold_survivors_suffice_and_one_fewer_fails():
    point = FixedPoint(bound=1.0, clients=10)
    _, quantized = _cohort_vectors(point, 10, 100)
    round_ = SecureSumRound(range(10), seed=5, threshold=7)
    masked = {c: round_.mask(c, quantized[c]) for c in range(7)}
    assert torch.equal(round_.unmask_sum(masked), _ring_sum(quantized[:7], 32))
    del masked[6]
    with pytest.raises(SecureAggregationFailed,
                       match=r"^6 of 10 clients survived, below the threshold 7$"):
        round_.unmask_sum(masked)
    with pytest.raises(SecureAggregationFailed, match="0 of 10 clients survived"):
        round_.unmask_sum({})


def test_a_neighbourhood_with_too_few_surviving_share_holders_fails():
    round_ = SecureSumRound(range(16), seed=3, threshold=12, neighbours=4)
    assert round_.share_threshold == math.ceil(12 * 5 / 16) == 4
    client = 0
    lost = round_.neighbours_of(client)[:2]  # client 0 keeps itself and 2 of 4 holders
    survivors = {c: round_.mask(c, torch.zeros(10, dtype=torch.int64))
                 for c in range(16) if c not in lost}
    assert len(survivors) == 14 >= round_.threshold
    with pytest.raises(SecureAggregationFailed,
                       match=r"client 0's secret has 3 surviving share holders, below the "
                             r"share threshold 4"):
        round_.unmask_sum(survivors)


def test_validation_errors_are_one_line():
    with pytest.raises(ValueError, match=r"threshold must be in 1\.\.5 \(the cohort size\), got 0"):
        SecureSumRound(range(5), seed=0, threshold=0)
    with pytest.raises(ValueError, match=r"threshold must be in 1\.\.5 .*got 6"):
        SecureSumRound(range(5), seed=0, threshold=6)
    with pytest.raises(ValueError, match="bits must be in 8..62, got 64"):
        SecureSumRound(range(5), seed=0, threshold=3, bits=64)
    with pytest.raises(ValueError, match="neighbours must be even and >= 2"):
        SecureSumRound(range(5), seed=0, threshold=3, neighbours=3)
    with pytest.raises(ValueError, match="repeats a client id"):
        SecureSumRound([1, 2, 2], seed=0, threshold=1)
    round_ = SecureSumRound([10, 20, 30], seed=0, threshold=2, bits=16)
    vector = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="client 40 is not in the secure-sum cohort"):
        round_.mask(40, vector)
    with pytest.raises(ValueError, match="client 40 is not in the secure-sum cohort"):
        round_.unmask_sum({10: round_.mask(10, vector), 40: vector})
    with pytest.raises(ValueError, match=r"masked vectors have different lengths \[3, 4\]"):
        round_.unmask_sum({10: round_.mask(10, vector), 20: round_.mask(20, vector[:3])})
    with pytest.raises(ValueError, match="client 10's vector must be 1-D int64, got torch.float32"):
        round_.mask(10, torch.zeros(4))
    with pytest.raises(ValueError, match=r"client 10's vector has values outside \[0, 2\^16\)"):
        round_.mask(10, torch.tensor([0, 2**16]))


# --- what the server sees of one client ----------------------------------------------------


@pytest.mark.parametrize("neighbours", [None, 4])
@pytest.mark.parametrize("level", [0, 0x5A5A5A5A])
def test_a_masked_vector_is_uniform_on_the_ring(neighbours: int | None, level: int):
    round_ = SecureSumRound(range(12), seed=9, threshold=6, neighbours=neighbours)
    constant = torch.full((32_000,), level, dtype=torch.int64)
    assert _uniformity_p(constant, 32) == 0.0  # the test sees a non-uniform vector
    assert _uniformity_p(round_.mask(4, constant), 32) > 0.001


def test_a_masked_vector_is_independent_of_its_input():
    inputs = torch.randint(0, 2**32, (32_000,), generator=_generator(2))  # every quarter
    # a negative control: a fixed offset keeps the dependence, and the test sees it
    assert _independence_p(inputs, (inputs + 2**29) & (2**32 - 1), 32) < 1e-100
    for seed in range(3):
        masked = SecureSumRound(range(12), seed=seed, threshold=6).mask(4, inputs)
        assert _independence_p(inputs, masked, 32) > 0.001


def test_same_seed_same_uploads_other_seed_other_uploads():
    vector = torch.arange(50, dtype=torch.int64)
    first = SecureSumRound([3, 1, 2, 4], seed=11, threshold=2)
    again = SecureSumRound([1, 2, 3, 4], seed=11, threshold=2)  # the order does not matter
    other = SecureSumRound([1, 2, 3, 4], seed=12, threshold=2)
    for client in (1, 2, 3, 4):
        assert torch.equal(first.mask(client, vector), again.mask(client, vector))
        assert not torch.equal(first.mask(client, vector), other.mask(client, vector))


def test_pairwise_masks_cancel_in_the_sum_of_all_clients():
    round_ = SecureSumRound(range(6), seed=4, threshold=6)
    zeros = torch.zeros(1000, dtype=torch.int64)
    pair = round_.pairwise_mask(1, 4, 1000)
    assert torch.equal(pair, round_.pairwise_mask(4, 1, 1000))  # both sides derive it
    assert pair.unique().numel() > 900
    uploads = [round_.mask(c, zeros) for c in range(6)]
    self_masks = [round_.self_mask(c, 1000) for c in range(6)]
    assert torch.equal(_ring_sum(uploads, 32), _ring_sum(self_masks, 32))


# --- SecAgg+ neighbours --------------------------------------------------------------------


def test_each_client_masks_with_exactly_k_neighbours_on_a_random_ring():
    clients, k = 30, 6
    round_ = SecureSumRound(range(clients), seed=8, threshold=15, neighbours=k)
    assert round_.degree == k
    zeros = torch.zeros(200, dtype=torch.int64)
    for client in range(clients):
        neighbours = round_.neighbours_of(client)
        assert len(set(neighbours)) == k and client not in neighbours
        assert all(client in round_.neighbours_of(other) for other in neighbours)
        # its upload is its self mask and the pair masks of exactly these k clients
        expected = round_.self_mask(client, 200)
        for other in neighbours:
            pair = round_.pairwise_mask(client, other, 200)
            expected = (expected + (pair if client < other else -pair)) & (2**32 - 1)
        assert torch.equal(round_.mask(client, zeros), expected)
    # seeded and shuffled: not the ring of consecutive ids, and another seed draws another
    assert any(set(round_.neighbours_of(c)) != {(c + o) % clients for o in (-3, -2, -1, 1, 2, 3)}
               for c in range(clients))
    other = SecureSumRound(range(clients), seed=9, threshold=15, neighbours=k)
    assert any(round_.neighbours_of(c) != other.neighbours_of(c) for c in range(clients))


def test_k_at_least_the_cohort_is_the_full_graph():
    round_ = SecureSumRound(range(5), seed=0, threshold=3, neighbours=4)
    assert round_.ring is None and round_.degree == 4
    assert round_.neighbours_of(2) == [0, 1, 3, 4]


def test_neighbours_recover_the_sum_with_dropouts_in_a_large_cohort():
    clients, length = 200, 500
    point = FixedPoint(bound=1.0, clients=clients)
    values, quantized = _cohort_vectors(point, clients, length)
    round_ = SecureSumRound(range(clients), seed=17, threshold=100, neighbours=8)
    assert round_.share_threshold == 5  # ceil(100 * 9 / 200)
    dropped = set(range(0, clients, 10))  # 20 dropouts, some of them neighbours
    survivors = [c for c in range(clients) if c not in dropped]
    ring_sum = round_.unmask_sum({c: round_.mask(c, quantized[c]) for c in survivors})
    assert torch.equal(ring_sum, _ring_sum([quantized[c] for c in survivors], 32))
    float_sum = torch.stack([values[c] for c in survivors]).sum(0)
    assert (point.dequantize(ring_sum) - float_sum).abs().max() <= point.sum_error_bound(180)


# --- bytes ---------------------------------------------------------------------------------


def test_upload_bytes():
    # two 32-byte keys, then per neighbour two 32-byte shares in a 36-byte envelope
    assert setup_upload_bytes(19) == 64 + 19 * 100 == 1964
    # 20 clients, every pair masks: + 4 bytes a coordinate + 20 (id, share) pairs of 36 bytes
    assert upload_bytes(100_000, 19) == 1964 + 400_000 + 20 * 36 == 402_684
    assert upload_bytes(100_000, 8, bits=12) == 64 + 800 + 200_000 + 9 * 36 == 201_188
    with pytest.raises(ValueError, match="bits must be in 8..62"):
        upload_bytes(10, 4, bits=70)
