"""The Taobao "Ad Display/Click" dataset: three CSVs -> cached, encoded train/validation/test.

Protocol of the literature for this dataset: the last day (2017-05-13, Beijing time) is the
test split, the days before are train. Settings are chosen on a validation split, the day(s)
just before the test day, so that the test day is not tuned on. Vocabularies, price statistics
and the popularity baseline come from the train split only; validation and test ids never seen
in train map to an OOV index, and missing values (empty profile levels, `NULL` brands, users
absent from user_profile.csv) get an index of their own instead of a guess.
Malformed rows (wrong field count, an id or time stamp that is not an integer, a bad price or
click flag) are never read as data: they stop preprocessing, or are dropped with `on_bad_rows`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from datamodules.base import DataError, FeatureSpec, PreparedData
from datamodules.cache import build_once, config_hash, fingerprint, generate_once
from datamodules.click_log import ClickLogDataModule
from datamodules.clients import ClientTable, partition_splits
from datamodules.csv_check import Rule, check_csv
from datamodules.frame_tensors import frame_tensor, labelled_rows
from datamodules.rank_auc import auc

log = logging.getLogger("fltk.data")

CACHE_VERSION = "4"
MISSING_INDEX = 0  # the value was absent in the raw data
OOV_INDEX = 1  # the value was not in the train vocabulary (unseen or rarer than min_count)
FIRST_VOCAB_INDEX = 2

RAW_SAMPLE = "raw_sample.csv"
USER_PROFILE = "user_profile.csv"
AD_FEATURE = "ad_feature.csv"

_INT = Rule(pl.Int64(), "not an integer")
_OPTIONAL_INT = Rule(pl.Int64(), "not an integer", missing_ok=True)  # levels, brand (`NULL`)
_FLAG = Rule(pl.Int64(), "not 0 or 1", accept=lambda v: v.is_in([0, 1]))
_TEXT = Rule(pl.String(), "not text", missing_ok=True)  # every string is a valid pid
# log1p(price) is a feature: a negative or infinite price would poison its mean and std
_PRICE = Rule(pl.Float64(), "not a number >= 0", accept=lambda v: v.is_finite() & (v >= 0))

# Expected columns (after stripping header whitespace) and the rule each value must follow.
SCHEMAS: dict[str, dict[str, Rule]] = {
    RAW_SAMPLE: {
        "user": _INT, "time_stamp": _INT, "adgroup_id": _INT,
        "pid": _TEXT, "nonclk": _FLAG, "clk": _FLAG,
    },
    USER_PROFILE: {
        "userid": _INT, "cms_segid": _INT, "cms_group_id": _INT,
        "final_gender_code": _INT, "age_level": _OPTIONAL_INT, "pvalue_level": _OPTIONAL_INT,
        "shopping_level": _OPTIONAL_INT, "occupation": _INT,
        "new_user_class_level": _OPTIONAL_INT,
    },
    AD_FEATURE: {
        "adgroup_id": _INT, "cate_id": _INT, "campaign_id": _INT,
        "customer": _INT, "brand": _OPTIONAL_INT, "price": _PRICE,
    },
}

CATEGORICAL_COLUMNS = [
    "user", "adgroup_id", "pid",
    "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
    "shopping_level", "occupation", "new_user_class_level",
    "cate_id", "campaign_id", "customer", "brand",
]
DERIVED_SPARSE = ["hour"]  # hour of day (local time); the raw Unix time is never an input
DENSE_COLUMNS = ["price"]


def _read_columns(path: Path) -> list[str]:
    """The stripped header of a CSV (the real user_profile.csv ends in 'new_user_class_level ').

    A UTF-8 byte-order mark (spreadsheet tools save one) is not part of the first name.
    """
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    if not header.strip():
        raise DataError(f"{path}: the file is empty; expected a header line")
    return [c.strip() for c in header.rstrip("\r\n").split(",")]


def _checked_columns(path: Path) -> list[str]:
    """The header of one Taobao CSV, checked to hold every column its schema needs."""
    columns = _read_columns(path)
    missing = [c for c in SCHEMAS[path.name] if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {columns}")
    return columns


class TaobaoDataModule(ClickLogDataModule):
    """Taobao Ad Display/Click data: real (data_dir) or synthetic (generated without data_dir).

    Args:
        data_dir: folder with raw_sample.csv, user_profile.csv and ad_feature.csv. Unset: synthetic
            data in the real format is generated (num_rows rows, from `seed`) under cache_dir.
        num_rows: rows of synthetic data to generate (ignored with data_dir).
        sparse_features: categorical inputs, each with its own embedding table. Allowed: the
            categorical columns of the three files and the derived `hour` (hour of day).
        dense_features: continuous inputs; allowed: `price` (log1p, standardized on train).
        min_count: ids seen fewer times in train share the OOV index.
        utc_offset_hours: the time zone of the day boundaries (the dataset's days are Beijing time).
        test_days: number of last days held out as the test split.
        validation_days: number of days just before the test days held out as the validation
            split (0: none; the datamodule then validates on the test split).
        on_bad_rows: what a malformed row (wrong field count, a non-integer id or time stamp, a
            price that is not a number >= 0, a click flag that is not 0/1) does: `error` stops
            with the file, count and first line; `skip` drops such rows with one warning per
            file (counted in the data info as `bad_rows_skipped`). Empty profile levels and
            `NULL` brands are missing values, not malformed.
        partition: `user` (default): every user is a client, its train and test rows together.
            `iid`, `dirichlet` or `power_law`: rows are dealt to `num_clients` synthetic clients
            by a Partitioner, to study a skew the natural split does not have. Applied when
            the cache is loaded, so changing it does not preprocess again.
        **kwargs: ClickLogDataModule's (num_clients, alpha, exponent, cache_dir) and
            CTRDataModule's (batch_size, eval_batch_size, min_client_samples, seed).
    """

    # "user": the natural split; the others deal rows to synthetic clients (datamodules.clients)
    partitions = ("user", "iid", "dirichlet", "power_law")
    natural_partition = "user"

    def __init__(
        self,
        data_dir: str | None = None,
        num_rows: int = 200_000,
        sparse_features: list[str] | None = None,
        dense_features: list[str] | None = None,
        min_count: int = 1,
        utc_offset_hours: int = 8,
        test_days: int = 1,
        validation_days: int = 1,
        on_bad_rows: Literal["error", "skip"] = "error",
        partition: str = "user",
        **kwargs: Any,
    ) -> None:
        super().__init__(partition, **kwargs)
        self.sparse_features = list(CATEGORICAL_COLUMNS if sparse_features is None
                                    else sparse_features)
        self.dense_features = list(DENSE_COLUMNS if dense_features is None else dense_features)
        allowed_sparse = CATEGORICAL_COLUMNS + DERIVED_SPARSE
        for name in self.sparse_features:
            if name not in allowed_sparse:
                raise ValueError(f"data.sparse_features: unknown feature {name!r}; "
                                 f"expected some of {allowed_sparse}")
        for name in self.dense_features:
            if name not in DENSE_COLUMNS:
                raise ValueError(f"data.dense_features: unknown feature {name!r}; "
                                 f"expected some of {DENSE_COLUMNS}")
        if not self.sparse_features:
            raise ValueError("data.sparse_features must name at least one feature")
        if min_count < 1 or test_days < 1 or num_rows < 1:
            raise ValueError("data.min_count, data.test_days and data.num_rows must be >= 1")
        if validation_days < 0:
            raise ValueError(f"data.validation_days must be >= 0, got {validation_days}")
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"data.on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        self.data_dir = Path(data_dir) if data_dir else None
        self.num_rows = num_rows
        self.min_count = min_count
        self.utc_offset_hours = utc_offset_hours
        self.test_days = test_days
        self.validation_days = validation_days
        self.on_bad_rows = on_bad_rows

    # ------------------------------------------------------------------ sources
    def source_dir(self) -> Path:
        """The folder of the three CSVs; synthetic data is generated there once if needed."""
        if self.data_dir is not None:
            if not self.data_dir.is_dir():
                raise DataError(f"data.data_dir {self.data_dir}: no such directory")
            return self.data_dir
        from datamodules.synthetic import GENERATOR_VERSION, generate_taobao

        out = self.cache_dir / "synthetic" / (
            f"taobao_rows{self.num_rows}_seed{self.seed}_v{GENERATOR_VERSION}")
        return generate_once(out, "synthetic_meta.json",
                             lambda tmp: generate_taobao(tmp, num_rows=self.num_rows,
                                                         seed=self.seed),
                             f"generating {self.num_rows} rows of synthetic Taobao data")

    def cache_key(self, source: Path) -> str:
        """Hash of everything the cached parquet depends on: config and source files."""
        config = {
            "version": CACHE_VERSION,
            "sparse": self.sparse_features,
            "dense": self.dense_features,
            "min_count": self.min_count,
            "utc_offset_hours": self.utc_offset_hours,
            "test_days": self.test_days,
            "validation_days": self.validation_days,
            "on_bad_rows": self.on_bad_rows,
            "sources": [fingerprint(source / n) for n in (RAW_SAMPLE, USER_PROFILE, AD_FEATURE)],
        }
        return config_hash(config)

    # ------------------------------------------------------------------ prepare
    def _build_prepared_dir(self) -> Path:
        source = self.source_dir()
        for name in (RAW_SAMPLE, USER_PROFILE, AD_FEATURE):
            if not (source / name).is_file():
                raise DataError(f"{source / name}: file not found (a Taobao data_dir holds "
                                f"{RAW_SAMPLE}, {USER_PROFILE} and {AD_FEATURE})")
        out = self.cache_dir / "prepared" / f"taobao-{self.cache_key(source)}"
        return build_once(out, source, lambda tmp: self._preprocess(source, tmp))

    def _good_rows(self, path: Path, work: Path) -> tuple[pl.LazyFrame, int]:
        """One CSV's well-formed rows (read from a parquet copy in `work`) and how many were bad.

        Raises DataError on a malformed row unless on_bad_rows is `skip`.
        """
        checked = check_csv(path, _checked_columns(path), SCHEMAS[path.name],
                            work / f"{path.stem}.checked.parquet")
        if checked.bad_rows:
            what = (f"{checked.bad_rows} malformed row(s) (first at line "
                    f"{checked.first_bad_line}: {checked.first_reason})")
            if self.on_bad_rows == "error":
                raise DataError(f"{path}: {what}; fix the file or set --data.on_bad_rows skip")
            log.warning("%s: skipped %s", path, what)
        return checked.good_rows(), checked.bad_rows

    def _joined(self, raw: pl.LazyFrame, profile: pl.LazyFrame,
                ads: pl.LazyFrame) -> pl.LazyFrame:
        """raw_sample left-joined to the user profile and the ad features, with the local day,
        the hour, and each row's position in raw_sample (`_row`): the joins do not keep the
        file's order, and it settles the order of a user's impressions of the same second."""
        profile = profile.rename({"userid": "user"})
        seconds_per_day = 86_400
        local_day = (pl.col("time_stamp") + self.utc_offset_hours * 3600) // seconds_per_day
        hour = ((pl.col("time_stamp") + self.utc_offset_hours * 3600) % seconds_per_day) // 3600
        return (
            raw.with_row_index("_row")
            .join(profile.unique("user", keep="first"), on="user", how="left")
            .join(ads.unique("adgroup_id", keep="first"), on="adgroup_id", how="left")
            .with_columns(local_day.alias("_day"), hour.alias("hour"))
        )

    def _preprocess(self, source: Path, out: Path) -> dict[str, Any]:
        log.info("data: checking the rows of %s", source)
        names = (RAW_SAMPLE, USER_PROFILE, AD_FEATURE)
        tables, bad_rows = zip(*(self._good_rows(source / n, out) for n in names), strict=True)
        joined_path = out / "joined.parquet"
        log.info("data: joining %s", source)
        self._joined(*tables).sink_parquet(joined_path)
        for checked in out.glob("*.checked.parquet"):
            checked.unlink()
        joined = pl.scan_parquet(joined_path)
        last_day = joined.select(pl.col("_day").max()).collect().item()
        if last_day is None:
            raise DataError(f"{source / RAW_SAMPLE}: no rows")
        test_start = last_day - self.test_days + 1
        validation_start = test_start - self.validation_days
        keep = self._split_days(validation_start, test_start)
        train = joined.filter(keep["train"])
        encoded, cardinalities = self._encoded_sparse(train)
        dense_exprs, price_mean, price_std = self._standardized_dense(train)

        columns = [pl.col("user"), pl.col("clk").cast(pl.Float32).alias("label"),
                   *encoded, *dense_exprs]
        counts = {}
        for split, rows in keep.items():
            log.info("data: writing the %s split", split)
            (joined.filter(rows).sort(["user", "time_stamp", "_row"])
             .select(columns).sink_parquet(out / f"{split}.parquet"))
            written = pl.scan_parquet(out / f"{split}.parquet")
            counts[split] = written.select(pl.len()).collect().item()

        baseline_auc = self._popularity_baseline(train, joined.filter(keep["test"]))
        joined_path.unlink()
        meta: dict[str, Any] = {
            "source": str(source),
            "sparse_features": self.sparse_features,
            "cardinalities": cardinalities,
            "dense_features": self.dense_features,
            "price_log1p_mean": price_mean,
            "price_log1p_std": price_std,
            "splits": list(keep),
            "test_first_local_day": int(test_start),
            **{f"rows_{split}": count for split, count in counts.items()},
            "baseline_auc": baseline_auc,
        }
        if self.validation_days:
            meta["validation_first_local_day"] = int(validation_start)
        if self.on_bad_rows == "skip":
            meta["bad_rows_skipped"] = dict(zip(names, bad_rows, strict=True))
        synthetic = source / "synthetic_meta.json"
        if synthetic.is_file():
            meta["oracle_auc"] = json.loads(synthetic.read_text())["oracle_auc"]
        return meta

    def _split_days(self, validation_start: int, test_start: int) -> dict[str, pl.Expr]:
        """Which rows each split keeps, by local day: train, validation (if any), test."""
        day = pl.col("_day")
        keep = {"train": day < validation_start}
        if self.validation_days:
            keep["validation"] = day.is_between(validation_start, test_start, closed="left")
        keep["test"] = day >= test_start
        return keep

    def _encoded_sparse(self, train: pl.LazyFrame) -> tuple[list[pl.Expr], list[int]]:
        """Each sparse feature as vocabulary indices built on the train rows only (missing and
        out-of-vocabulary values get their own indices), and each vocabulary's size."""
        log.info("data: building train vocabularies for %d features", len(self.sparse_features))
        encoded, cardinalities = [], []
        for name in self.sparse_features:
            vocab = (
                train.select(name).drop_nulls().group_by(name).len()
                .filter(pl.col("len") >= self.min_count).sort(name).collect()
            )[name]
            indices = pl.int_range(FIRST_VOCAB_INDEX, FIRST_VOCAB_INDEX + len(vocab), eager=True)
            encoded.append(
                pl.when(pl.col(name).is_null()).then(pl.lit(MISSING_INDEX, pl.Int32))
                .otherwise(pl.col(name).replace_strict(vocab, indices, default=OOV_INDEX,
                                                       return_dtype=pl.Int32))
                .alias(f"s_{name}")
            )
            cardinalities.append(FIRST_VOCAB_INDEX + len(vocab))
        return encoded, cardinalities

    def _standardized_dense(self, train: pl.LazyFrame
                            ) -> tuple[list[pl.Expr], float, float]:
        """The dense features (log1p price, standardized with the train rows' statistics),
        and that mean and standard deviation. The statistics are summed over sorted values:
        a parallel sum in the order the joins happen to leave gave other last digits from
        run to run, and so other inputs."""
        log_price = pl.col("price").log1p()
        values = np.sort(train.select(log_price).drop_nulls().collect().to_series().to_numpy())
        price_mean = float(values.mean()) if values.size else 0.0
        price_std = (float(values.std(ddof=1)) if values.size > 1 else 1.0) or 1.0
        dense = {"price": ((log_price - price_mean) / price_std).fill_null(0.0)}
        return ([dense[n].cast(pl.Float32).alias(f"d_{n}") for n in self.dense_features],
                price_mean, price_std)

    @staticmethod
    def _popularity_baseline(train: pl.LazyFrame, test: pl.LazyFrame) -> float | None:
        """AUC on the test rows of each ad's train click rate (the global rate for unseen ads)."""
        global_rate = train.select(pl.col("clk").mean()).collect().item()
        rates = train.group_by("adgroup_id").agg(pl.col("clk").mean().alias("rate"))
        test = (test.join(rates, on="adgroup_id", how="left")
                .select(pl.col("rate").fill_null(global_rate), "clk").collect())
        labels = test["clk"].to_numpy().astype(np.float32)
        if labels.min(initial=1) == labels.max(initial=0):
            return None  # AUC undefined with one class
        return auc(test["rate"].to_numpy().astype(np.float32), labels)

    # ------------------------------------------------------------------ load
    def load(self) -> PreparedData:
        prepared = self._prepared_dir()
        meta = json.loads((prepared / "meta.json").read_text())
        sparse_cols = [f"s_{n}" for n in meta["sparse_features"]]
        dense_cols = [f"d_{n}" for n in meta["dense_features"]]
        splits = {}
        for split in meta["splits"]:
            frame = pl.read_parquet(prepared / f"{split}.parquet")
            splits[split] = (labelled_rows(frame, dense_cols, sparse_cols),
                             frame_tensor(frame, ["user"], np.int64).reshape(-1))
        partition_facts: dict[str, float] = {}
        if self.partitioner is None:  # rows are stored sorted by user
            tables = {split: ClientTable.from_sorted(*rows, client_key=users)
                      for split, (rows, users) in splits.items()}
        else:
            tables, partition_facts = partition_splits(
                self.partitioner, {split: rows for split, (rows, _) in splits.items()})
        info = {k: meta[k] for k in ("baseline_auc", "oracle_auc", "bad_rows_skipped")
                if meta.get(k) is not None}
        info["source"] = meta["source"]
        info.update(partition_facts)
        label_mean = float(tables["train"].label.mean())
        features = FeatureSpec(meta["sparse_features"], meta["cardinalities"],
                               meta["dense_features"],
                               label_mean=label_mean if 0.0 < label_mean < 1.0 else None)
        return PreparedData(tables["train"], tables["test"], features, info,
                            validation=tables.get("validation"))

