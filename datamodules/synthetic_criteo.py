"""Synthetic data in the format of the Criteo Display Advertising Challenge (Kaggle `train.txt`).

Why it exists: the real log (45M lines) cannot ship with the project and its best achievable AUC
is unknown, so a weak federated run cannot be told apart from a bug. This writes `train.txt` with
the real quirks (no header, tab-separated, empty fields for missing values, negative integers in
I2, trailing empty fields stripped on some lines) from a planted click model whose true
probabilities are known; `synthetic_meta.json` records the oracle AUC on the last 10% of lines
(the test split of CriteoDataModule's default `test_fraction`).

The click model is what DLRM can represent: a scalar effect per categorical value (Zipf-like
value frequencies, 10 to 50k values per feature at 200k rows), the log1p of 13 log-normal counts
entering linearly, and a small factorized interaction on three feature pairs. Each value's
effect and interaction vector are shrunk by its row count (half the variance at _SHRINK_ROWS
rows), so the click signal sits in values a model can learn: with 50 instead of 2000, a
centralized DLRM stayed 0.04 below the oracle at 200k rows, most of the gap in rare values no
model could estimate. Vocabulary sizes are set for 200k rows and shrink below it; above it
values are seen more often, which is how experiments/criteo.yaml (1M rows) gets near the oracle.

Generation is vectorised but not chunked (memory grows with num_rows; fine up to a few million)
and deterministic: one seed and row count give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.click_model import sigmoid, solve_bias, standardized
from datamodules.rank_auc import auc

GENERATOR_VERSION = "criteo-synthetic-2"
TRAIN_FILE = "train.txt"
META_FILE = "synthetic_meta.json"
CLICK_RATE = 0.25  # Criteo's is ~0.26
TEST_FRACTION = 0.1
_MISSING = np.iinfo(np.int64).min  # an absent count, written as an empty field
_REFERENCE_ROWS = 200_000  # vocabulary sizes below are for this many rows, scaled down below it
_INTERACTION_DIM = 4
_INTERACTION_SCALE = 0.35  # RMS of each pair's dot product on the logit scale
_SHRINK_ROWS = 2000  # rows at which a value's effect has half its full variance
_NEGATIVE_I2_RATE = 0.05  # share of I2 values in {-1, -2, -3}, as in the real file


@dataclass(frozen=True)
class _Sparse:
    """One categorical column: vocabulary size, Zipf exponent, missing rate, effect RMS."""

    size: int
    zipf: float
    missing: float
    effect: float


# C1..C26: each tuple below is one parameter, its i-th entry for column C(i+1). Only the last
# three may be missing at the line's end, so a stripped line keeps 37..40 fields, as in the real
# file. High-cardinality columns get small effects: most of their values are seen a handful of
# times, and a large planted effect there could not be learned.
_SPARSE = tuple(_Sparse(*feature) for feature in zip(
    # size: vocabulary size at _REFERENCE_ROWS rows
    (1_000, 500, 50_000, 20_000, 200, 12, 8_000, 400, 10, 15_000, 3_000, 40_000, 2_500, 25,
     6_000, 30_000, 10, 3_000, 1_500, 10, 35_000, 15, 15, 10_000, 80, 8_000),
    # zipf: exponent of the value shares
    (1.2, 1.1, 1.0, 1.0, 1.2, 1.0, 1.1, 1.3, 1.5, 1.0, 1.1, 1.0, 1.1, 1.2, 1.1, 1.0, 1.0, 1.1,
     1.2, 1.0, 1.0, 1.3, 1.2, 1.1, 1.2, 1.1),
    # missing: share of rows without a value
    (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0,
     0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.0, 0.44, 0.44),
    # effect: RMS of the per-value effects on the logit scale
    (0.30, 0.25, 0.10, 0.10, 0.35, 0.30, 0.20, 0.20, 0.15, 0.10, 0.25, 0.10, 0.20, 0.35, 0.20,
     0.10, 0.30, 0.20, 0.20, 0.20, 0.10, 0.15, 0.25, 0.15, 0.25, 0.15),
    strict=True,
))
# I1..I13: mean and sd of the log count, missing rate, and weight of log1p(count) in the logit.
_DENSE = (
    (0.8, 1.2, 0.45, 0.20), (2.0, 1.5, 0.0, -0.10), (2.2, 1.3, 0.21, 0.10),
    (1.5, 1.0, 0.22, 0.15), (7.0, 2.0, 0.03, -0.10), (3.0, 1.8, 0.22, 0.10),
    (1.8, 1.5, 0.04, 0.25), (2.0, 1.0, 0.0, 0.05), (3.5, 1.4, 0.04, -0.05),
    (0.3, 0.6, 0.45, 0.30), (1.0, 1.0, 0.04, 0.20), (0.3, 1.0, 0.77, 0.10),
    (2.0, 1.2, 0.22, -0.15),
)
# Column indices (into C1..C26) of the pairs with a factorized interaction: mid-size columns,
# whose values are seen often enough for their embeddings to be learned.
_PAIRS = ((0, 4), (6, 13), (10, 16))


def generate_criteo(out_dir: str | Path, num_rows: int = 200_000, seed: int = 0) -> dict:
    """Write `train.txt` and `synthetic_meta.json` into `out_dir`; return the meta."""
    if num_rows < 10:
        raise ValueError(f"num_rows must be >= 10, got {num_rows}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = min(1.0, num_rows / _REFERENCE_ROWS)
    codes = [_draw_codes(rng, max(2, round(f.size * scale)), f, num_rows) for f in _SPARSE]
    main = np.zeros(num_rows)
    for column, feature in zip(codes, _SPARSE, strict=True):
        main += _value_table(rng, column, feature.effect)[column]
    counts, dense_logit = _draw_dense(rng, num_rows)
    interaction = sum(_interaction(rng, codes[a], codes[b]) for a, b in _PAIRS)
    score = main + dense_logit + interaction
    bias = solve_bias(score, CLICK_RATE)
    probability = sigmoid(bias + score)
    label = (rng.random(num_rows) < probability).astype(np.int8)
    _write(out / TRAIN_FILE, label, counts, codes, rng)

    test = slice(num_rows - round(TEST_FRACTION * num_rows), None)
    meta = {
        "generator": "datamodules.synthetic_criteo",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_rows": num_rows,
        "test_fraction": TEST_FRACTION,
        "num_test": len(label[test]),
        "click_rate": float(label.mean()),
        "bias": bias,
        "logit_std": float(score.std()),
        "oracle_auc": auc(probability[test], label[test]),
        # what a model without feature crosses could reach at best
        "oracle_auc_without_interactions": auc((main + dense_logit)[test], label[test]),
        "vocabulary_sizes": [int(c.max(initial=0)) + 1 for c in codes],
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _draw_codes(rng: np.random.Generator, size: int, feature: _Sparse,
                rows: int) -> np.ndarray:
    """Value id of every row (Zipf-like shares, id 0 the most frequent), -1 for missing."""
    weights = np.arange(1, size + 1, dtype=np.float64) ** -feature.zipf
    cumulative = np.cumsum(weights / weights.sum())
    codes = np.minimum(np.searchsorted(cumulative, rng.random(rows)), size - 1)
    return np.where(rng.random(rows) < feature.missing, -1, codes)


def _value_table(rng: np.random.Generator, codes: np.ndarray, rms: float) -> np.ndarray:
    """Per-value effects (last entry: missing, 0) with mean 0 and RMS `rms` over the rows.

    A value's effect has variance n / (n + _SHRINK_ROWS) for its n rows, so rare values, which
    no model could learn, carry little of the click signal.
    """
    size = int(codes.max(initial=0)) + 1
    raw = rng.normal(0.0, 1.0, size) * _shrinkage(codes, size)
    return np.r_[standardized(raw, codes[codes >= 0], rms), 0.0]


def _shrinkage(codes: np.ndarray, size: int) -> np.ndarray:
    """Per value: the share sqrt(n / (n + _SHRINK_ROWS)) of its effect kept, n its rows."""
    rows = np.bincount(codes[codes >= 0], minlength=size)
    return np.sqrt(rows / (rows + _SHRINK_ROWS))


def _draw_dense(rng: np.random.Generator, rows: int) -> tuple[list[np.ndarray], np.ndarray]:
    """13 integer count columns (_MISSING where absent, some negative I2) and their logit term.

    The logit uses the same transform as CriteoDataModule: negatives clamped to 0, log1p,
    missing -> 0; each column's term is centered on the rows.
    """
    counts, logit = [], np.zeros(rows)
    for index, (mu, sigma, missing, weight) in enumerate(_DENSE):
        count = np.floor(rng.lognormal(mu, sigma, rows)).astype(np.int64)
        if index == 1:
            negative = rng.random(rows) < _NEGATIVE_I2_RATE
            count = np.where(negative, -rng.integers(1, 4, rows), count)
        present = rng.random(rows) >= missing
        feature = np.where(present, np.log1p(np.maximum(count, 0)), 0.0)
        logit += weight * (feature - feature.mean())
        counts.append(np.where(present, count, _MISSING))
    return counts, logit


def _interaction(rng: np.random.Generator, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Dot product of per-value vectors of two columns (0 where either is missing)."""
    vectors = []
    for codes in (left, right):
        size = int(codes.max(initial=0)) + 1
        table = rng.normal(0.0, 1.0, (size, _INTERACTION_DIM)) * _shrinkage(codes, size)[:, None]
        vectors.append(np.r_[table, np.zeros((1, _INTERACTION_DIM))][codes])
    dot = np.einsum("ij,ij->i", *vectors)
    return dot * (_INTERACTION_SCALE / max(float(dot.std()), 1e-12))


_HEX_PAIRS = np.array([f"{b:02x}" for b in range(256)], dtype="S2").view(np.uint8).reshape(256, 2)


def hex_names(rng: np.random.Generator, size: int) -> pl.Series:
    """Distinct pseudo-random 8-hex-digit strings for value ids 0..size-1 (vectorised: the
    Kaggle-sized benchmark needs tens of millions).

    An odd multiplier and an offset modulo 2**32 are a bijection, so the names are distinct.
    """
    multiplier = np.uint64(int(rng.integers(0, 1 << 31)) * 2 + 1)
    offset = np.uint64(int(rng.integers(0, 1 << 32)))
    ids = (np.arange(size, dtype=np.uint64) * multiplier + offset).astype(">u4")
    return pl.Series(_HEX_PAIRS[ids.view(np.uint8)].reshape(-1).view("S8")).cast(pl.String)


def train_lines(columns: list[pl.Expr], strip: np.ndarray) -> pl.DataFrame:
    """One train.txt line per row: the columns tab-joined, trailing empty fields stripped
    where `strip` is set (the real file has both kinds of lines)."""
    line = pl.concat_str(columns, separator="\t")
    strip_tail = pl.lit(pl.Series(strip))
    return pl.select(pl.when(strip_tail).then(line.str.strip_chars_end("\t")).otherwise(line))


def _write(path: Path, label: np.ndarray, counts: list[np.ndarray], codes: list[np.ndarray],
           rng: np.random.Generator) -> None:
    """train.txt: missing fields empty, trailing empty fields stripped on half of the lines."""
    columns = [pl.lit(pl.Series(label)).cast(pl.String)]
    for count in counts:
        value = pl.lit(pl.Series(count))
        columns.append(pl.when(value == _MISSING).then(pl.lit("")).otherwise(value.cast(pl.String)))
    for code in codes:
        names = hex_names(rng, int(code.max(initial=0)) + 1).append(pl.Series([""]))
        columns.append(pl.lit(names.gather(code)))  # code -1 is the last entry: missing
    frame = train_lines(columns, rng.random(len(label)) < 0.5)
    frame.write_csv(path, include_header=False, quote_style="never")
