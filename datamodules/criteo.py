"""The Criteo Display Advertising Challenge log (Kaggle `train.txt`) -> cached, encoded splits.

Each line is `label, I1..I13, C1..C26`, tab-separated without a header: integer counts (may be
empty or negative) and 8-hex-digit hashed categories (may be empty); trailing empty fields may
be stripped. The file is in time order, so its last lines are the test split. Dense values
follow the DLRM reference (negatives clamped to 0, then log(x + 1), missing -> 0); categories
get train-only vocabularies (as for Taobao) or, like DLRM's `num_embeddings_per_feature`,
fixed-size hash buckets. Criteo has no user id, so clients come from a `Partitioner`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from datamodules.base import CTRDataModule, DataError, FeatureSpec, PreparedData
from datamodules.cache import PreparedCache, build_once, config_hash, fingerprint, generate_once
from datamodules.clients import ClientTable
from datamodules.partition import Kind, Partitioner, describe, to_client_table
from datamodules.synthetic_criteo import GENERATOR_VERSION, META_FILE, generate_criteo
from datamodules.taobao import FIRST_VOCAB_INDEX, MISSING_INDEX, OOV_INDEX, _tensor

log = logging.getLogger("fltk.data")

CACHE_VERSION = "1"
TRAIN_FILE = "train.txt"
DENSE_COLUMNS = [f"I{i}" for i in range(1, 14)]
SPARSE_COLUMNS = [f"C{i}" for i in range(1, 27)]
# The label is read as text so that any value other than 0/1 can be reported with its line.
SCHEMA = {"label": pl.String, **dict.fromkeys(DENSE_COLUMNS, pl.Int64),
          **dict.fromkeys(SPARSE_COLUMNS, pl.String)}
PARTITIONS = ("iid", "dirichlet", "power_law")  # "key" needs a user id, which Criteo lacks
LINE = "_line"  # 1-based line number of a row in train.txt


class CriteoDataModule(PreparedCache, CTRDataModule):
    """Criteo click log (real or synthetic), split by line order, clients from a partitioner.

    Args:
        data_dir: folder holding `train.txt`. Unset: synthetic data in the real format, with a
            known oracle AUC, is generated (num_rows lines, from `seed`) under cache_dir.
        num_rows: lines of synthetic data to generate (ignored with data_dir).
        test_fraction: share of the lines, taken from the end of the file, held out as the test
            split: line i (0-based) is train when i < (1 - test_fraction) * N.
        min_count: in vocabulary mode, categories seen fewer times in train share the OOV index.
        num_embeddings_per_feature: 26 bucket counts (each >= 2) switching to hashing mode: a
            category's hex string read as an integer h maps to 1 + h % (size - 1), index 0
            staying for missing. No vocabulary is built; test values need no OOV index.
            Exclusive with a min_count other than 1.
        partition: how rows are dealt to clients: `iid`, `dirichlet` (label skew, `alpha`) or
            `power_law` (Zipf-like sizes, `exponent`); see datamodules.partition.
        num_clients, alpha, exponent: passed to the Partitioner.
        cache_dir: where generated data and the preprocessed parquet splits live.
        batch_size, eval_batch_size, min_client_samples, seed: see CTRDataModule; `seed` also
            seeds the partition.

    Test rows get their own draw of the same partition kind and num_clients (seed + 1, no
    minimum size), so every client's per-client metrics have rows to work on; Criteo has no
    identity linking a client's test rows to its train rows, so the two draws are independent.

    Memory: parsing (text -> parquet), the vocabulary counts and the encoding of both splits run
    as lazy polars queries sunk to parquet, so the raw file is never held in memory at once.
    Not streamed: each vocabulary (the largest Criteo columns have millions of values), and
    `load`, which holds both encoded splits as tensors (plus one copy while rows are grouped by
    client) and the partition's per-row client arrays. Partitioning runs in `load`, so changing
    the partition reuses the cache.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        num_rows: int = 200_000,
        test_fraction: float = 0.1,
        min_count: int = 1,
        num_embeddings_per_feature: list[int] | None = None,
        partition: str = "iid",
        num_clients: int = 1000,
        alpha: float = 0.5,
        exponent: float = 1.0,
        cache_dir: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 65536,
        min_client_samples: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, min_client_samples, seed)
        if num_rows < 10:
            raise ValueError(f"data.num_rows must be >= 10, got {num_rows}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        if min_count < 1:
            raise ValueError(f"data.min_count must be >= 1, got {min_count}")
        if num_embeddings_per_feature is not None:
            sizes = list(num_embeddings_per_feature)
            if len(sizes) != len(SPARSE_COLUMNS) or min(sizes) < 2:
                raise ValueError(
                    f"data.num_embeddings_per_feature must hold {len(SPARSE_COLUMNS)} sizes, "
                    f"each >= 2, got {sizes}")
            if min_count != 1:
                raise ValueError("data.min_count and data.num_embeddings_per_feature exclude "
                                 "each other (hash buckets have no vocabulary to prune)")
            num_embeddings_per_feature = sizes
        if partition not in PARTITIONS:
            raise ValueError(f"data.partition must be one of {PARTITIONS}, got {partition!r}")
        try:
            self.partitioner = Partitioner(cast(Kind, partition), num_clients, alpha, exponent,
                                           seed=seed)
        except ValueError as e:  # name the config argument, not the Partitioner's
            raise ValueError(f"data.{str(e).removeprefix('partition: ')}") from e
        self.num_clients = num_clients
        self.data_dir = Path(data_dir) if data_dir else None
        self.num_rows = num_rows
        self.test_fraction = test_fraction
        self.min_count = min_count
        self.num_embeddings_per_feature = num_embeddings_per_feature
        self.cache_dir = Path(cache_dir or os.environ.get("FLTK_CACHE")
                              or Path.home() / ".cache" / "fltk")

    # ------------------------------------------------------------------ prepare
    def source(self) -> Path:
        """train.txt of data_dir, or of synthetic data generated once under cache_dir."""
        path = (self.data_dir or self._synthetic_dir()) / TRAIN_FILE
        if not path.is_file():
            raise DataError(f"{path}: file not found (a Criteo data_dir holds {TRAIN_FILE})")
        return path

    def _synthetic_dir(self) -> Path:
        out = self.cache_dir / "synthetic" / (
            f"criteo-{self.num_rows}-{self.seed}-{GENERATOR_VERSION}")
        return generate_once(out, META_FILE,
                             lambda tmp: generate_criteo(tmp, num_rows=self.num_rows,
                                                         seed=self.seed),
                             f"generating {self.num_rows} lines of synthetic Criteo data")

    def cache_key(self, source: Path) -> str:
        """Hash of everything the cached parquet depends on (not the partition: see `load`)."""
        config = {
            "version": CACHE_VERSION,
            "test_fraction": self.test_fraction,
            "min_count": self.min_count,
            "num_embeddings_per_feature": self.num_embeddings_per_feature,
            "source": fingerprint(source),
        }
        return config_hash(config)

    def _build_prepared_dir(self) -> Path:
        source = self.source()
        out = self.cache_dir / "prepared" / f"criteo-{self.cache_key(source)}"
        return build_once(out, source, lambda tmp: self._preprocess(source, tmp))

    @staticmethod
    def _parse(source: Path, out: Path) -> pl.LazyFrame:
        """train.txt as typed columns with line numbers (short lines padded with nulls).

        `missing_columns="insert"` lets the first line be short too (polars otherwise takes
        its field count as the file's); a line with more than 40 fields is an error.
        Written once to parquet, so later passes do not parse the text again.
        """
        raw_path = out / "raw.parquet"
        scan = pl.scan_csv(source, separator="\t", has_header=False, schema=SCHEMA,
                           quote_char=None, missing_columns="insert")
        scan = scan.with_row_index(LINE, offset=1)
        try:
            scan.sink_parquet(raw_path)
        except pl.exceptions.PolarsError as e:
            reason = str(e).strip().splitlines()[0]
            raise DataError(f"{source}: cannot parse as Criteo (label, 13 integers, 26 "
                            f"categories, tab-separated): {reason}") from e
        raw = pl.scan_parquet(raw_path)
        bad = (raw.filter(~pl.col("label").is_in(["0", "1"]).fill_null(False))
               .select(LINE, "label").head(1).collect())
        if bad.height:
            raise DataError(f"{source}: line {bad[LINE][0]}: label {bad['label'][0]!r} "
                            "is not 0 or 1")
        return raw

    def _encoders(self, train: pl.LazyFrame) -> tuple[list[pl.Expr], list[int]]:
        """One index expression and cardinality per categorical column (index 0 = missing)."""
        if self.num_embeddings_per_feature is not None:
            exprs = [
                (pl.col(name).str.to_integer(base=16) % (size - 1) + 1)
                .fill_null(MISSING_INDEX).cast(pl.Int32).alias(name)
                for name, size in zip(SPARSE_COLUMNS, self.num_embeddings_per_feature,
                                      strict=True)
            ]
            return exprs, list(self.num_embeddings_per_feature)
        vocabs = pl.collect_all([
            train.select(name).drop_nulls().group_by(name).len()
            .filter(pl.col("len") >= self.min_count).sort(name).select(name)
            for name in SPARSE_COLUMNS
        ])
        exprs, cardinalities = [], []
        for name, frame in zip(SPARSE_COLUMNS, vocabs, strict=True):
            vocab = frame[name]
            indices = pl.int_range(FIRST_VOCAB_INDEX, FIRST_VOCAB_INDEX + len(vocab), eager=True)
            exprs.append(
                pl.when(pl.col(name).is_null()).then(pl.lit(MISSING_INDEX, pl.Int32))
                .otherwise(pl.col(name).replace_strict(vocab, indices, default=OOV_INDEX,
                                                       return_dtype=pl.Int32))
                .alias(name)
            )
            cardinalities.append(FIRST_VOCAB_INDEX + len(vocab))
        return exprs, cardinalities

    def _preprocess(self, source: Path, out: Path) -> dict[str, Any]:
        log.info("data: parsing %s", source)
        raw = self._parse(source, out)
        num_rows = raw.select(pl.len()).collect().item()
        # round() absorbs float noise such as (1 - 0.3) * 10 = 7.000000000000001
        num_train = min(num_rows, math.ceil(round((1 - self.test_fraction) * num_rows, 9)))
        is_train = pl.col(LINE) <= num_train
        log.info("data: encoding %d categorical columns", len(SPARSE_COLUMNS))
        sparse, cardinalities = self._encoders(raw.filter(is_train))
        dense = [pl.col(name).clip(lower_bound=0).cast(pl.Float64).log1p().fill_null(0.0)
                 .cast(pl.Float32).alias(name) for name in DENSE_COLUMNS]
        columns = [pl.col("label").cast(pl.Float32), *sparse, *dense]
        for split, keep in (("train", is_train), ("test", ~is_train)):
            raw.filter(keep).select(columns).sink_parquet(out / f"{split}.parquet")
        (out / "raw.parquet").unlink()
        meta = {
            "source": str(source),
            "cardinalities": cardinalities,
            "hashed": self.num_embeddings_per_feature is not None,
            "rows_train": num_train,
            "rows_test": num_rows - num_train,
        }
        synthetic = source.parent / META_FILE
        if synthetic.is_file():  # the oracle was scored on the generator's test split only
            planted = json.loads(synthetic.read_text())
            if planted["test_fraction"] == self.test_fraction:
                meta["oracle_auc"] = planted["oracle_auc"]
        return meta

    # ------------------------------------------------------------------ load
    def load(self) -> PreparedData:
        prepared = self._prepared_dir()
        meta = json.loads((prepared / "meta.json").read_text())
        info: dict[str, Any] = {k: meta[k] for k in ("source", "oracle_auc") if k in meta}
        tables: dict[str, ClientTable] = {}
        for split, partitioner in (
            ("train", self.partitioner),
            ("test", dataclasses.replace(self.partitioner, seed=self.seed + 1, min_size=0)),
        ):
            frame = pl.read_parquet(prepared / f"{split}.parquet")
            label = _tensor(frame, ["label"], np.float32, width=1).reshape(-1)
            client_of_row = partitioner(label.numpy())
            tables[split] = to_client_table(
                _tensor(frame, DENSE_COLUMNS, np.float32, width=len(DENSE_COLUMNS)),
                _tensor(frame, SPARSE_COLUMNS, np.int64, width=len(SPARSE_COLUMNS)),
                label, client_of_row)
            if split == "train":
                facts = describe(client_of_row, self.num_clients, label.numpy())
                info.update({f"partition_{k}": v for k, v in facts.items()})
                log.info("data: %s partition of train: %s", self.partitioner.kind,
                         ", ".join(f"{k}={v:.4g}" for k, v in facts.items()))
        label_mean = float(tables["train"].label.mean())
        features = FeatureSpec(SPARSE_COLUMNS, meta["cardinalities"], DENSE_COLUMNS,
                               label_mean=label_mean if 0.0 < label_mean < 1.0 else None)
        return PreparedData(tables["train"], tables["test"], features, info)
