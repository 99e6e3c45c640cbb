"""The Criteo Display Advertising Challenge log (Kaggle `train.txt`) -> cached, encoded splits.

Each line is `label, I1..I13, C1..C26`, tab-separated without a header: integer counts (may be
empty or negative) and 8-hex-digit hashed categories (may be empty); trailing empty fields may
be stripped. The file is in time order, so its last lines are the test split. Dense values
follow the DLRM reference (negatives clamped to 0, then log(x + 1), missing -> 0); categories
get train-only vocabularies (as for Taobao) or, like DLRM's `num_embeddings_per_feature`,
fixed-size hash buckets. Criteo has no user id, so clients come from a `Partitioner`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from datamodules.base import DataError, FeatureSpec, PreparedData
from datamodules.cache import build_once, config_hash, fingerprint, generate_once
from datamodules.click_log import ClickLogDataModule
from datamodules.clients import partition_splits
from datamodules.frame_tensors import labelled_rows
from datamodules.synthetic_criteo import GENERATOR_VERSION, META_FILE, generate_criteo
from datamodules.taobao import FIRST_VOCAB_INDEX, MISSING_INDEX, OOV_INDEX
from datamodules.utf8_lines import non_utf8_line

log = logging.getLogger("fltk.data")

CACHE_VERSION = "2"
TRAIN_FILE = "train.txt"
DENSE_COLUMNS = [f"I{i}" for i in range(1, 14)]
SPARSE_COLUMNS = [f"C{i}" for i in range(1, 27)]
# The label is read as text so that any value other than 0/1 can be reported with its line.
SCHEMA = {"label": pl.String, **dict.fromkeys(DENSE_COLUMNS, pl.Int64),
          **dict.fromkeys(SPARSE_COLUMNS, pl.String)}
LINE = "_line"  # 1-based line number of a row in train.txt
INDEX = "_index"  # a vocabulary's index column while it is joined
Encoder = Callable[[pl.LazyFrame], pl.LazyFrame]


class CriteoDataModule(ClickLogDataModule):
    """Criteo click log (real or synthetic), split by line order, clients from a partitioner.

    Args:
        data_dir: folder holding `train.txt`. Unset: synthetic data in the real format, with a
            known oracle AUC, is generated (num_rows lines, from `seed`) under cache_dir.
        num_rows: lines of synthetic data to generate (ignored with data_dir).
        test_fraction: share of the lines, taken from the end of the file, held out as the test
            split: line i (0-based) comes before the test lines when i < (1 - test_fraction) * N.
        validation_fraction: share of the M lines before the test lines, taken from their end,
            held out as the validation split: line i is train when i < (1 -
            validation_fraction) * M (0: none; the datamodule then validates on the test split).
        min_count: in vocabulary mode, categories seen fewer times in train share the OOV index;
            vocabularies come from the train lines only (unseen validation and test values
            are OOV).
        num_embeddings_per_feature: 26 bucket counts (each >= 2) switching to hashing mode: a
            category's hex string read as an integer h maps to 1 + h % (size - 1), index 0
            staying for missing. No vocabulary is built; test values need no OOV index.
            Exclusive with a min_count other than 1.
        partition: how rows are dealt to clients: `iid`, `dirichlet` or `power_law`.
        **kwargs: ClickLogDataModule's (num_clients, alpha, exponent, cache_dir) and
            CTRDataModule's (batch_size, eval_batch_size, min_client_samples, seed).

    Test and validation rows get their own draws of the same partition kind and num_clients
    (seeds + 1 and + 2, no minimum size), so every client's per-client metrics have rows to work
    on; Criteo has no identity linking a client's evaluation rows to its train rows, so the
    draws are independent.

    Memory: parsing (text -> parquet), the vocabulary counts and the encoding of both splits run
    as streaming polars queries sunk to parquet, so the raw file is never held in memory at once.
    Not streamed: the vocabularies (~33M values for the Kaggle file, a few GB with their join
    hash tables), and `load`, which holds both encoded splits as tensors (plus one copy while
    rows are grouped by client) and the partition's per-row client arrays. Partitioning runs in
    `load`, so changing the partition reuses the cache.
    """

    partitions = ("iid", "dirichlet", "power_law")  # "key" needs a user id, which Criteo lacks

    def __init__(
        self,
        data_dir: str | None = None,
        num_rows: int = 200_000,
        test_fraction: float = 0.1,
        validation_fraction: float = 0.1,
        min_count: int = 1,
        num_embeddings_per_feature: list[int] | None = None,
        partition: str = "iid",
        **kwargs: Any,
    ) -> None:
        super().__init__(partition, **kwargs)
        if num_rows < 10:
            raise ValueError(f"data.num_rows must be >= 10, got {num_rows}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(
                f"data.validation_fraction must be in [0, 1), got {validation_fraction}")
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
        self.data_dir = Path(data_dir) if data_dir else None
        self.num_rows = num_rows
        self.test_fraction = test_fraction
        self.validation_fraction = validation_fraction
        self.min_count = min_count
        self.num_embeddings_per_feature = num_embeddings_per_feature

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
            "validation_fraction": self.validation_fraction,
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
        try:
            _scan_lines(source, SCHEMA).sink_parquet(raw_path)
        except pl.exceptions.PolarsError as e:
            reason = (non_utf8_line(source) or CriteoDataModule._bad_integer(source)
                      or "cannot parse as Criteo (label, 13 integers, 26 categories, "
                      f"tab-separated): {str(e).strip().splitlines()[0]}")
            raise DataError(f"{source}: {reason}") from e
        raw = pl.scan_parquet(raw_path)
        bad = (raw.filter(~pl.col("label").is_in(["0", "1"]).fill_null(False))
               .select(LINE, "label").head(1).collect(engine="streaming"))
        if bad.height:
            raise DataError(f"{source}: line {bad[LINE][0]}: label {bad['label'][0]!r} "
                            "is not 0 or 1")
        return raw

    @staticmethod
    def _bad_integer(source: Path) -> str | None:
        """`line N: I3 'abc' is not an integer` for the first such field, if there is one.

        Run only once parsing failed, to say where polars' reason (which has no line) arose;
        None if the file fails for another reason, such as a line with too many fields.
        """
        scan = _scan_lines(source, {**SCHEMA, **dict.fromkeys(DENSE_COLUMNS, pl.String)})
        bad = [pl.col(name).is_not_null() & pl.col(name).str.to_integer(strict=False).is_null()
               for name in DENSE_COLUMNS]
        try:
            first = scan.filter(pl.any_horizontal(bad)).head(1).collect(engine="streaming")
        except pl.exceptions.PolarsError:
            return None
        if not first.height:
            return None
        name = next(n for n, b in zip(DENSE_COLUMNS, first.select(bad).row(0), strict=True) if b)
        return f"line {first[LINE][0]}: {name} {first[name][0]!r} is not an integer"

    def _encoders(self, train: pl.LazyFrame) -> tuple[Encoder, list[int]]:
        """A function indexing the categorical columns of a split (index 0 = missing), and
        each column's cardinality."""
        if self.num_embeddings_per_feature is not None:
            exprs = [
                (pl.col(name).str.to_integer(base=16) % (size - 1) + 1)
                .fill_null(MISSING_INDEX).cast(pl.Int32).alias(name)
                for name, size in zip(SPARSE_COLUMNS, self.num_embeddings_per_feature,
                                      strict=True)
            ]
            return (lambda frame: frame.with_columns(exprs)), list(self.num_embeddings_per_feature)
        vocabs = pl.collect_all([
            train.select(name).drop_nulls().group_by(name).len()
            .filter(pl.col("len") >= self.min_count).sort(name).select(name)
            for name in SPARSE_COLUMNS
        ], engine="streaming")
        tables = [
            vocab.with_columns(pl.int_range(FIRST_VOCAB_INDEX, FIRST_VOCAB_INDEX + vocab.height,
                                            dtype=pl.Int32).alias(INDEX)).lazy()
            for vocab in vocabs
        ]
        return partial(_lookup, tables=tables), [FIRST_VOCAB_INDEX + v.height for v in vocabs]

    def _preprocess(self, source: Path, out: Path) -> dict[str, Any]:
        log.info("data: parsing %s", source)
        raw = self._parse(source, out)
        num_rows = raw.select(pl.len()).collect().item()
        before_test = _leading_lines(1 - self.test_fraction, num_rows)
        num_train = _leading_lines(1 - self.validation_fraction, before_test)
        line = pl.col(LINE)
        keep = {"train": line <= num_train}
        if self.validation_fraction:
            keep["validation"] = line.is_between(num_train, before_test, closed="right")
        keep["test"] = line > before_test
        log.info("data: encoding %d categorical columns", len(SPARSE_COLUMNS))
        encode, cardinalities = self._encoders(raw.filter(keep["train"]))
        dense = [pl.col(name).clip(lower_bound=0).cast(pl.Float64).log1p().fill_null(0.0)
                 .cast(pl.Float32).alias(name) for name in DENSE_COLUMNS]
        columns = [pl.col("label").cast(pl.Float32), *SPARSE_COLUMNS, *dense]
        for split, rows in keep.items():
            encode(raw.filter(rows)).select(columns).sink_parquet(out / f"{split}.parquet")
        (out / "raw.parquet").unlink()
        meta = {
            "source": str(source),
            "cardinalities": cardinalities,
            "hashed": self.num_embeddings_per_feature is not None,
            "splits": list(keep),
            "rows_train": num_train,
            "rows_test": num_rows - before_test,
        }
        if self.validation_fraction:
            meta["rows_validation"] = before_test - num_train
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
        splits = {}
        for split in meta["splits"]:
            frame = pl.read_parquet(prepared / f"{split}.parquet")
            splits[split] = labelled_rows(frame, DENSE_COLUMNS, SPARSE_COLUMNS)
        tables, facts = partition_splits(self.partitioner, splits)
        info.update(facts)
        label_mean = float(tables["train"].label.mean())
        features = FeatureSpec(SPARSE_COLUMNS, meta["cardinalities"], DENSE_COLUMNS,
                               label_mean=label_mean if 0.0 < label_mean < 1.0 else None)
        return PreparedData(tables["train"], tables["test"], features, info,
                            validation=tables.get("validation"))


def _leading_lines(share: float, total: int) -> int:
    """How many of `total` lines have a 0-based index i < share * total."""
    # round() absorbs float noise such as (1 - 0.3) * 10 = 7.000000000000001
    return min(total, math.ceil(round(share * total, 9)))


def _scan_lines(source: Path, schema: dict[str, type[pl.DataType]]) -> pl.LazyFrame:
    """train.txt read lazily with `schema`, each row numbered by its 1-based line (LINE)."""
    return pl.scan_csv(source, separator="\t", has_header=False, schema=schema,
                       quote_char=None, missing_columns="insert").with_row_index(LINE, offset=1)


def _lookup(frame: pl.LazyFrame, tables: list[pl.LazyFrame]) -> pl.LazyFrame:
    """Each categorical column replaced by its index in a (name, INDEX) vocabulary table.

    Left joins, with the vocabulary as the build side, stream the rows; `replace_strict`
    with vocabularies this large does not (its memory grew with the rows: 4 GB at 6M lines).
    A missing value (a null key, which joins nothing) gets index 0, an unseen one the OOV index.
    """
    for table in tables:
        name = table.collect_schema().names()[0]
        frame = (frame.join(table, on=name, how="left", maintain_order="left",
                            build_side="force_right")
                 .with_columns(pl.when(pl.col(name).is_null())
                               .then(pl.lit(MISSING_INDEX, pl.Int32))
                               .otherwise(pl.col(INDEX).fill_null(OOV_INDEX)).alias(name))
                 .drop(INDEX))
    return frame
