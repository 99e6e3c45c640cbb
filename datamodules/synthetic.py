"""Synthetic data in the exact format of the Taobao "Ad Display/Click Data" (Alimama, Tianchi 56).

Why it exists: the real dataset (26M impressions) cannot ship with the project, and its best
achievable AUC is unknown, so a weak federated run cannot be told apart from a bug. This module
writes the dataset's three CSV files (`raw_sample.csv`, `user_profile.csv`, `ad_feature.csv`) with
the real headers, value ranges, missing values and cardinality ratios, from a planted click model
whose true probabilities are known. `synthetic_meta.json` records the oracle AUC (the true
probabilities on the test day) and a popularity baseline, so a CTR model trained on the days before
it can be scored against both.

The click model is a factorization machine over the dataset's own columns: per-value effects of
the profile columns, category, brand, customer, campaign and pid, plus a user x category affinity
whose user side is mostly a sum of profile-value vectors, plus small per-user and per-ad terms.
An embedding model (FM, DLRM) can therefore learn it from the data.

Generation is vectorised and chunked (memory grows with the number of users, ads and rows, not with
Python objects) and deterministic: one seed and row count give byte-identical files, whatever
`chunk_rows` is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.click_model import sigmoid, solve_bias, standardized
from datamodules.rank_auc import auc

GENERATOR_VERSION = "taobao-synthetic-2"
PIDS = ("430548_1007", "430539_1007")
TIME_START = 1_494_000_000  # 2017-05-06 00:00 Beijing time (UTC+8)
TEST_START = 1_494_604_800  # 2017-05-13 00:00 Beijing time: the test day starts
TIME_END = 1_494_691_200  # 2017-05-14 00:00 Beijing time (exclusive)
RAW_COLUMNS = ("user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk")
PROFILE_COLUMNS = (
    "userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
    "shopping_level", "occupation", "new_user_class_level ",  # the real header's trailing space
)
AD_COLUMNS = ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price")

# Largest ids of the real data: ids are drawn without replacement from [1, max], so a small
# dataset has sparse ids and a full-size one nearly contiguous ids, as in the real files.
_REAL_MAX_ID = {
    "user": 1_141_729, "adgroup": 846_811, "cate": 12_960, "campaign": 423_436,
    "customer": 255_875, "brand": 461_497,
}
_BLOCK_ROWS = 1 << 16  # rows per random stream: the output does not depend on chunk_rows
_MIN_USER_ROWS = 3
_MISSING_PROFILE_FRACTION = 0.03
_NULL_BRAND_FRACTION = 0.3
_PID_PROBS = (0.53, 0.47)
# Relative activity per Beijing-time hour (quiet nights, evening peak), tiled over the 8 days.
_HOURLY_ACTIVITY = (4, 2, 1, 1, 1, 1, 2, 4, 6, 7, 8, 8, 8, 8, 7, 7, 7, 7, 8, 9, 10, 10, 9, 7)
_HOUR_P = np.tile(_HOURLY_ACTIVITY, (TIME_END - TIME_START) // 86_400) / (8 * sum(_HOURLY_ACTIVITY))
# Probabilities per code. Code 0 of pvalue_level / new_user_class_level means "empty".
_PROFILE_PROBS = {
    "final_gender_code": (0.0, 0.4, 0.6),
    "age_level": (0.005, 0.025, 0.12, 0.32, 0.29, 0.215, 0.025),
    "pvalue_level": (0.5, 0.15, 0.3, 0.05),
    "shopping_level": (0.0, 0.07, 0.12, 0.81),
    "occupation": (0.94, 0.06),
    "new_user_class_level": (0.3, 0.1, 0.38, 0.11, 0.11),
}
_CATEGORY_ZIPF = 1.0  # exponent of the power law of category shares
_ADS_PER_CATEGORY = 126  # the real ratio: 846k adgroups, 6.7k categories
_NUM_SEGIDS = 97
_SEGID_ZERO_PROB = 0.6
# Relative weight of each profile column in the user effect and in the user latent vector.
# Many-valued cms_segid gets little latent weight: its vectors would need much data to learn.
_PROFILE_WEIGHTS = {
    "final_gender_code": (1.0, 1.0), "age_level": (1.0, 1.0), "cms_segid": (0.7, 0.2),
    "cms_group_id": (0.6, 0.6), "shopping_level": (0.5, 0.5), "pvalue_level": (0.5, 0.5),
    "occupation": (0.3, 0.2), "new_user_class_level": (0.4, 0.4),
}


@dataclass(frozen=True)
class ClickModel:
    """Scales of the planted click model (standard deviations on the logit scale)."""

    click_rate: float = 0.05  # target mean click probability, reached by solving for the bias
    latent_dim: int = 8
    profile_effect: float = 0.5  # all profile-value main effects together
    affinity: float = 1.0  # user x category dot product
    user_vector_noise: float = 0.05  # per-user part of the user vector, relative to the profile
    user_effect: float = 0.05  # per-user idiosyncratic term
    category_effect: float = 0.4
    brand_effect: float = 0.2
    customer_effect: float = 0.1
    campaign_effect: float = 0.05
    ad_effect: float = 0.05  # per-ad idiosyncratic term
    pid_effect: float = 0.15


@dataclass(frozen=True)
class _Sizes:
    """Entity counts for a row count, in the real dataset's ratios."""

    rows: int
    users: int
    ads: int
    categories: int
    campaigns: int
    customers: int
    brands: int

    @classmethod
    def for_rows(cls, rows: int) -> _Sizes:
        ads = rows // 31
        return cls(
            rows=rows, users=rows // 23, ads=ads,
            categories=max(20, min(6700, ads // _ADS_PER_CATEGORY)),
            campaigns=max(1, ads // 2), customers=max(1, round(0.3 * ads)),
            brands=max(1, round(0.12 * ads)),
        )


@dataclass(frozen=True)
class TaobaoWorld:
    """The hidden state behind a synthetic dataset: entities, attributes and click model.

    Rebuilt exactly by `build_world(num_rows, seed)`, so the true click probability of any
    written row can be recomputed (`click_probability`) without storing it in the CSVs.
    """

    user_ids: np.ndarray  # sorted; user index = position
    profile: dict[str, np.ndarray]  # column -> code per user (0 = empty for the nullable ones)
    in_profile: np.ndarray  # whether the user is written to user_profile.csv
    user_activity: np.ndarray  # relative number of impressions per user
    ad_ids: np.ndarray  # sorted; ad index = position
    ad_attributes: dict[str, np.ndarray]  # ad_feature column -> value per ad (brand -1 = NULL)
    ad_popularity: np.ndarray  # relative number of impressions per ad
    ad_category: np.ndarray  # category index per ad
    user_logit: np.ndarray
    user_vector: np.ndarray
    ad_logit: np.ndarray
    category_vector: np.ndarray
    pid_logit: np.ndarray
    bias: float

    def click_probability(self, user: np.ndarray, adgroup_id: np.ndarray,
                          pid: np.ndarray) -> np.ndarray:
        """True click probability of rows given by their raw `user`, `adgroup_id`, `pid` values."""
        pid_index = np.full(len(pid), -1)
        for code, name in enumerate(PIDS):
            pid_index[np.asarray(pid) == name] = code
        if (pid_index < 0).any():
            raise ValueError(f"unknown pid, expected one of {PIDS}")
        return self.probability(_positions(self.user_ids, user, "user"),
                                _positions(self.ad_ids, adgroup_id, "adgroup_id"), pid_index)

    def probability(self, user: np.ndarray, ad: np.ndarray, pid: np.ndarray) -> np.ndarray:
        """True click probability from user, ad and pid indices."""
        return sigmoid(self.bias + self._score(user, ad, pid))

    def _score(self, user: np.ndarray, ad: np.ndarray, pid: np.ndarray) -> np.ndarray:
        affinity = np.einsum(
            "ij,ij->i", self.user_vector[user], self.category_vector[self.ad_category[ad]]
        )
        return self.user_logit[user] + self.ad_logit[ad] + self.pid_logit[pid] + affinity


def generate_taobao(out_dir: str | Path, num_rows: int = 200_000, seed: int = 0, *,
                    chunk_rows: int = 1_000_000, model: ClickModel | None = None) -> dict:
    """Write a synthetic Taobao dataset and `synthetic_meta.json` into `out_dir`; return the meta.

    The test day is the last one (time_stamp >= TEST_START); the meta's AUCs are on its rows.
    """
    if num_rows < 1000:
        raise ValueError(f"num_rows must be at least 1000, got {num_rows}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    model = model or ClickModel()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world_seq, rows_seq, blocks_seq = np.random.SeedSequence(seed).spawn(3)
    world = _build_world(_Sizes.for_rows(num_rows), world_seq, model)
    _write_user_profile(world, out / "user_profile.csv")
    _write_ad_feature(world, out / "ad_feature.csv")
    user_of_row, ad_of_row = _assign_rows(world, num_rows, np.random.default_rng(rows_seq))
    stats = _write_raw_sample(world, user_of_row, ad_of_row, blocks_seq, chunk_rows,
                              out / "raw_sample.csv")
    meta = _meta(world, stats, num_rows, seed, model)
    (out / "synthetic_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_world(num_rows: int, seed: int = 0, model: ClickModel | None = None) -> TaobaoWorld:
    """The world `generate_taobao(..., num_rows, seed, model=model)` draws its rows from."""
    world_seq = np.random.SeedSequence(seed).spawn(3)[0]
    return _build_world(_Sizes.for_rows(num_rows), world_seq, model or ClickModel())


# --- the world ---------------------------------------------------------------------------------


def _build_world(sizes: _Sizes, seq: np.random.SeedSequence, model: ClickModel) -> TaobaoWorld:
    """Draw users, ads and click-model parameters, then solve for the bias."""
    users_rng, ads_rng, calibration_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    profile = _draw_profiles(users_rng, sizes.users)
    user_logit, user_vector = _user_parameters(users_rng, profile, model)
    ads = _draw_ads(ads_rng, sizes)
    ad_logit, category_vector = _ad_parameters(ads_rng, ads, sizes, model)
    world = TaobaoWorld(
        user_ids=_distinct_ids(users_rng, sizes.users, _REAL_MAX_ID["user"]),
        profile=profile,
        in_profile=_profile_mask(users_rng, sizes.users),
        user_activity=users_rng.lognormal(0.0, 1.2, sizes.users),
        ad_ids=ads["adgroup_id"],
        ad_attributes=_ad_attributes(ads_rng, ads, sizes),
        ad_popularity=ads_rng.lognormal(0.0, 1.3, sizes.ads),
        ad_category=ads["category"],
        user_logit=user_logit,
        user_vector=user_vector,
        ad_logit=ad_logit,
        category_vector=category_vector,
        pid_logit=np.array([1.0, -1.0]) * model.pid_effect,
        bias=0.0,
    )
    return replace(world, bias=_calibrated_bias(world, sizes, calibration_rng, model.click_rate))


def _draw_profiles(rng: np.random.Generator, users: int) -> dict[str, np.ndarray]:
    """Profile codes per user with the real marginals; cms_group_id follows gender and age."""
    profile = {name: rng.choice(len(p), users, p=np.array(p) / sum(p)).astype(np.int64)
               for name, p in _PROFILE_PROBS.items()}
    zipf = 1.0 / np.arange(1, _NUM_SEGIDS)
    segid = 1 + rng.choice(_NUM_SEGIDS - 1, users, p=zipf / zipf.sum())
    profile["cms_segid"] = np.where(rng.random(users) < _SEGID_ZERO_PROB, 0, segid)
    age, gender = profile["age_level"], profile["final_gender_code"]
    profile["cms_group_id"] = np.where(age == 0, 0, np.where(gender == 2, age, age + 6))
    return profile


def _user_parameters(rng: np.random.Generator, profile: dict[str, np.ndarray],
                     model: ClickModel) -> tuple[np.ndarray, np.ndarray]:
    """User logit offsets and latent vectors, mostly sums of per-profile-value parameters."""
    users, dim = len(profile["age_level"]), model.latent_dim
    main_norm, latent_norm = np.sqrt(np.square(list(_PROFILE_WEIGHTS.values())).sum(axis=0))
    logit = rng.normal(0.0, model.user_effect, users)
    vector = rng.normal(0.0, model.user_vector_noise / np.sqrt(dim), (users, dim))
    for name, (main_weight, latent_weight) in _PROFILE_WEIGHTS.items():
        codes = profile[name]
        values = codes.max() + 1
        effect = standardized(rng.normal(0.0, 1.0, values), codes, main_weight / main_norm)
        latent = standardized(rng.normal(0.0, 1.0, (values, dim)), codes,
                              latent_weight / latent_norm)
        logit += model.profile_effect * effect[codes]
        vector += latent[codes]
    return logit, vector * model.affinity


def _draw_ads(rng: np.random.Generator, sizes: _Sizes) -> dict[str, np.ndarray]:
    """Ad hierarchy (customer > campaign > ad) with power-law category and brand shares."""
    category_weights = rng.permutation(np.arange(1, sizes.categories + 1) ** -_CATEGORY_ZIPF)
    category_p = category_weights / category_weights.sum()
    customer_category = rng.choice(sizes.categories, sizes.customers, p=category_p)
    customer_brand = _cover(rng, sizes.customers, np.ones(sizes.brands))
    campaign_customer = _cover(rng, sizes.campaigns, rng.lognormal(0.0, 1.0, sizes.customers))
    campaign_category = _mix(rng, customer_category[campaign_customer], 0.7,
                             rng.choice(sizes.categories, sizes.campaigns, p=category_p))
    campaign_brand = _mix(rng, customer_brand[campaign_customer], 0.9,
                          rng.integers(0, sizes.brands, sizes.campaigns))
    campaign_brand[rng.random(sizes.campaigns) < _NULL_BRAND_FRACTION] = -1
    ad_campaign = _cover(rng, sizes.ads, rng.lognormal(0.0, 0.8, sizes.campaigns))
    return {
        "adgroup_id": _distinct_ids(rng, sizes.ads, _REAL_MAX_ID["adgroup"]),
        "campaign": ad_campaign,
        "customer": campaign_customer[ad_campaign],
        "brand": campaign_brand[ad_campaign],
        "category": _mix(rng, campaign_category[ad_campaign], 0.9,
                         rng.choice(sizes.categories, sizes.ads, p=category_p)),
    }


def _ad_parameters(rng: np.random.Generator, ads: dict[str, np.ndarray], sizes: _Sizes,
                   model: ClickModel) -> tuple[np.ndarray, np.ndarray]:
    """Ad logit offsets (category, brand, customer, campaign, ad) and category vectors."""
    brand_effect = np.r_[rng.normal(0.0, model.brand_effect, sizes.brands), 0.0]  # [-1]: NULL
    category = ads["category"]
    category_effect = standardized(rng.normal(0.0, 1.0, sizes.categories), category,
                                   model.category_effect)
    logit = (
        category_effect[category]
        + brand_effect[ads["brand"]]
        + rng.normal(0.0, model.customer_effect, sizes.customers)[ads["customer"]]
        + rng.normal(0.0, model.campaign_effect, sizes.campaigns)[ads["campaign"]]
        + rng.normal(0.0, model.ad_effect, sizes.ads)
    )
    vector = rng.normal(0.0, 1.0, (sizes.categories, model.latent_dim))
    return logit, standardized(vector, category, np.sqrt(model.latent_dim))


def _ad_attributes(rng: np.random.Generator, ads: dict[str, np.ndarray],
                   sizes: _Sizes) -> dict[str, np.ndarray]:
    """The ad_feature.csv columns: raw ids per ad and a heavy-tailed price."""
    def ids(key: str, count: int) -> np.ndarray:
        return _distinct_ids(rng, count, _REAL_MAX_ID[key])

    brand_ids = ids("brand", sizes.brands)
    return {
        "adgroup_id": ads["adgroup_id"],
        "cate_id": ids("cate", sizes.categories)[ads["category"]],
        "campaign_id": ids("campaign", sizes.campaigns)[ads["campaign"]],
        "customer": ids("customer", sizes.customers)[ads["customer"]],
        "brand": np.where(ads["brand"] >= 0, brand_ids[ads["brand"]], -1),
        "price": _prices(rng, ads["category"], sizes.categories),
    }


def _prices(rng: np.random.Generator, category: np.ndarray, categories: int) -> np.ndarray:
    """Lognormal prices around 150 with a per-category level and a rare x100 outlier."""
    level = rng.normal(np.log(150.0), 1.0, categories)[category]
    price = np.exp(level + rng.normal(0.0, 0.6, len(category)))
    price *= np.where(rng.random(len(category)) < 0.002, 100.0, 1.0)
    return np.maximum(np.round(price, 1), 0.1)


def _profile_mask(rng: np.random.Generator, users: int) -> np.ndarray:
    """Users written to user_profile.csv: all but ~3%, at least one missing."""
    mask = np.ones(users, dtype=bool)
    missing = max(1, round(_MISSING_PROFILE_FRACTION * users))
    mask[rng.choice(users, missing, replace=False)] = False
    return mask


def _calibrated_bias(world: TaobaoWorld, sizes: _Sizes, rng: np.random.Generator,
                     click_rate: float, samples: int = 1 << 17) -> float:
    """Bias giving the target mean click probability over impressions (solved on a sample)."""
    user = _sample(rng, _MIN_USER_ROWS + world.user_activity / world.user_activity.mean()
                   * (sizes.rows / sizes.users - _MIN_USER_ROWS), samples)
    ad = _sample(rng, 1 + world.ad_popularity / world.ad_popularity.mean()
                 * (sizes.rows / sizes.ads - 1), samples)
    pid = (rng.random(samples) >= _PID_PROBS[0]).astype(np.int64)
    return solve_bias(world._score(user, ad, pid), click_rate)


# --- the rows ----------------------------------------------------------------------------------


def _assign_rows(world: TaobaoWorld, rows: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """User and ad index of every row: each user >= 3 rows, each ad >= 1, power-law extras."""
    users, ads = len(world.user_ids), len(world.ad_ids)
    user_rows = _MIN_USER_ROWS + rng.multinomial(
        rows - _MIN_USER_ROWS * users, world.user_activity / world.user_activity.sum())
    ad_rows = 1 + rng.multinomial(rows - ads, world.ad_popularity / world.ad_popularity.sum())
    user_of_row = np.repeat(np.arange(users, dtype=np.int32), user_rows)
    ad_of_row = np.repeat(np.arange(ads, dtype=np.int32), ad_rows)
    rng.shuffle(user_of_row)
    rng.shuffle(ad_of_row)
    return user_of_row, ad_of_row


@dataclass
class _RowStats:
    """What the meta needs from the rows, accumulated chunk by chunk."""

    train_impressions: np.ndarray  # per ad
    train_clicks: np.ndarray  # per ad
    user_in_train: np.ndarray  # per user
    test_probability: list[np.ndarray]
    test_click: list[np.ndarray]
    test_ad: list[np.ndarray]
    test_user: list[np.ndarray]
    clicks: int = 0

    @classmethod
    def empty(cls, users: int, ads: int) -> _RowStats:
        return cls(np.zeros(ads, np.int64), np.zeros(ads, np.int64), np.zeros(users, bool),
                   [], [], [], [])

    def add(self, user: np.ndarray, ad: np.ndarray, time: np.ndarray, probability: np.ndarray,
            click: np.ndarray) -> None:
        train = time < TEST_START
        self.train_impressions += np.bincount(ad[train], minlength=len(self.train_impressions))
        self.train_clicks += np.bincount(ad[train], weights=click[train],
                                         minlength=len(self.train_clicks)).astype(np.int64)
        self.user_in_train[user[train]] = True
        test = ~train
        self.test_probability.append(probability[test])
        self.test_click.append(click[test])
        self.test_ad.append(ad[test])
        self.test_user.append(user[test])
        self.clicks += int(click.sum())


def _write_raw_sample(world: TaobaoWorld, user_of_row: np.ndarray, ad_of_row: np.ndarray,
                      blocks_seq: np.random.SeedSequence, chunk_rows: int, path: Path) -> _RowStats:
    """Draw time, pid and click of every row and append raw_sample.csv chunk by chunk."""
    rows = len(user_of_row)
    chunk = max(1, chunk_rows // _BLOCK_ROWS) * _BLOCK_ROWS
    stats = _RowStats.empty(len(world.user_ids), len(world.ad_ids))
    with path.open("wb") as handle:
        handle.write((",".join(RAW_COLUMNS) + "\n").encode())
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            user, ad = user_of_row[start:stop], ad_of_row[start:stop]
            time, pid, uniform = _row_draws(blocks_seq, start, stop, rows)
            probability = world.probability(user, ad, pid)
            click = (uniform < probability).astype(np.int8)
            _raw_frame(world, user, ad, time, pid, click).write_csv(handle, include_header=False)
            stats.add(user, ad, time, probability, click)
    return stats


def _row_draws(blocks_seq: np.random.SeedSequence, start: int, stop: int,
               rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Timestamps, pid codes and click uniforms of rows [start, stop), one stream per block."""
    parts = []
    for block in range(start // _BLOCK_ROWS, -(-stop // _BLOCK_ROWS)):
        seq = np.random.SeedSequence(blocks_seq.entropy, spawn_key=(*blocks_seq.spawn_key, block))
        rng = np.random.default_rng(seq)
        count = min(_BLOCK_ROWS, rows - block * _BLOCK_ROWS)
        hour = rng.choice(len(_HOUR_P), count, p=_HOUR_P)
        time = TIME_START + hour * 3600 + rng.integers(0, 3600, count)
        pid = (rng.random(count) >= _PID_PROBS[0]).astype(np.int64)
        parts.append((time, pid, rng.random(count)))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _raw_frame(world: TaobaoWorld, user: np.ndarray, ad: np.ndarray, time: np.ndarray,
               pid: np.ndarray, click: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({
        "user": world.user_ids[user],
        "time_stamp": time,
        "adgroup_id": world.ad_ids[ad],
        "pid": np.asarray(PIDS)[pid],
        "nonclk": 1 - click,
        "clk": click,
    })


# --- the other files and the meta --------------------------------------------------------------


def _write_user_profile(world: TaobaoWorld, path: Path) -> None:
    """user_profile.csv: the profiled users, empty pvalue / new_user_class levels left blank."""
    columns = {"userid": world.user_ids, **{name: world.profile[name.strip()]
                                            for name in PROFILE_COLUMNS[1:]}}
    nullable = ("pvalue_level", "new_user_class_level ")
    frame = pl.DataFrame(columns).filter(pl.Series(world.in_profile)).with_columns(
        pl.when(pl.col(name) > 0).then(pl.col(name)).alias(name) for name in nullable
    )
    frame.write_csv(path)


def _write_ad_feature(world: TaobaoWorld, path: Path) -> None:
    """ad_feature.csv with `NULL` for missing brands, as in the real file."""
    frame = pl.DataFrame(world.ad_attributes).with_columns(
        pl.when(pl.col("brand") >= 0).then(pl.col("brand")).alias("brand")
    )
    frame.write_csv(path, null_value="NULL")


def _meta(world: TaobaoWorld, stats: _RowStats, rows: int, seed: int, model: ClickModel) -> dict:
    """The dataset's sizes, click rate and test-day AUCs of the oracle and popularity baseline."""
    test_click = np.concatenate(stats.test_click)
    test_ad = np.concatenate(stats.test_ad)
    test_users = np.unique(np.concatenate(stats.test_user))
    train_rate = stats.train_clicks.sum() / max(1, stats.train_impressions.sum())
    seen = stats.train_impressions > 0
    popularity = np.where(seen, stats.train_clicks / np.maximum(stats.train_impressions, 1),
                          train_rate)
    ads = world.ad_attributes
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_rows": rows,
        "num_train": rows - len(test_click),
        "num_test": len(test_click),
        "num_users": len(world.user_ids),
        "num_profile_users": int(world.in_profile.sum()),
        "num_ads": len(world.ad_ids),
        "num_categories": len(np.unique(ads["cate_id"])),
        "num_campaigns": len(np.unique(ads["campaign_id"])),
        "num_customers": len(np.unique(ads["customer"])),
        "num_brands": len(np.unique(ads["brand"][ads["brand"] >= 0])),
        "click_rate": stats.clicks / rows,
        "test_click_rate": float(test_click.mean()),
        "test_users_seen_in_train": float(stats.user_in_train[test_users].mean()),
        "oracle_auc": _json_float(auc(np.concatenate(stats.test_probability), test_click)),
        "popularity_auc": _json_float(auc(popularity[test_ad], test_click)),
        "test_start": TEST_START,
        "time_range": [TIME_START, TIME_END],
        "bias": world.bias,
        "click_model": asdict(model),
    }


# --- helpers -----------------------------------------------------------------------------------


def _distinct_ids(rng: np.random.Generator, count: int, real_max: int) -> np.ndarray:
    """Sorted distinct positive ids from [1, max(real_max, 1.05 * count)]."""
    high = max(real_max, int(np.ceil(1.05 * count)))
    return np.sort(rng.choice(high, count, replace=False)).astype(np.int64) + 1


def _cover(rng: np.random.Generator, items: int, weights: np.ndarray) -> np.ndarray:
    """Group of each item: every group used once (while items last), the rest by weight."""
    groups = len(weights)
    extra = rng.choice(groups, max(0, items - groups), p=weights / weights.sum())
    return rng.permutation(np.r_[rng.permutation(groups)[:items], extra])


def _mix(rng: np.random.Generator, inherited: np.ndarray, keep: float,
         other: np.ndarray) -> np.ndarray:
    """`inherited` with probability `keep`, else `other`, element-wise."""
    return np.where(rng.random(len(inherited)) < keep, inherited, other)


def _sample(rng: np.random.Generator, weights: np.ndarray, count: int) -> np.ndarray:
    return rng.choice(len(weights), count, p=weights / weights.sum())


def _positions(sorted_ids: np.ndarray, ids: np.ndarray, name: str) -> np.ndarray:
    """Index of each raw id in a sorted id array; ValueError for unknown ids."""
    ids = np.asarray(ids, dtype=np.int64)
    index = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    if (sorted_ids[index] != ids).any():
        raise ValueError(f"unknown {name} id(s) for this world")
    return index


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else value
