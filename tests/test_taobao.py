"""The Taobao pipeline on a hand-written fixture in the real format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from datamodules.base import DataError
from datamodules.taobao import MISSING_INDEX, OOV_INDEX, TaobaoDataModule
from tests.conftest import AD_FEATURE, DAY, RAW_SAMPLE, TEST_DAY_START, USER_PROFILE, write_taobao

REAL_EXCERPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao_excerpt"


def _module(data_dir: Path, tmp_path: Path, **kwargs) -> TaobaoDataModule:
    """The fixture's hand-worked train/test expectations predate the validation split, so it is
    off unless a test asks for it."""
    kwargs = {"validation_days": 0, **kwargs}
    dm = TaobaoDataModule(data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    return dm


def _column(dm: TaobaoDataModule, split: str, feature: str) -> list[int]:
    table = getattr(dm.data, split)
    return table.sparse[:, dm.feature_spec.sparse.index(feature)].tolist()


def test_last_beijing_day_is_test_and_rows_are_sorted_by_user(taobao_dir, tmp_path):
    dm = _module(taobao_dir, tmp_path)
    train, test = dm.data.train, dm.data.test
    # 1494604799 is 23:59:59 on 2017-05-12 in Beijing (train) though 15:59:59 UTC on the 12th;
    # 1494604800 is the first second of the test day.
    assert train.num_rows == 5 and test.num_rows == 3
    assert train.client_ids.tolist() == [1, 2, 3]
    assert train.offsets.tolist() == [0, 2, 4, 5]
    assert test.client_ids.tolist() == [1, 2, 4]
    assert train.label.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # user 2: time order kept
    assert test.label.tolist() == [0.0, 0.0, 1.0]


def test_missing_values_get_their_own_index_never_the_mode(taobao_dir, tmp_path):
    dm = _module(taobao_dir, tmp_path)
    pvalue = _column(dm, "train", "pvalue_level")
    new_user = _column(dm, "train", "new_user_class_level")
    brand = _column(dm, "train", "brand")
    segid = _column(dm, "train", "cms_segid")
    # rows: user1/ad10, user1/ad11, user2/ad10, user2/ad11, user3/ad11
    assert pvalue[2] == pvalue[3] == MISSING_INDEX and pvalue[0] > OOV_INDEX
    assert new_user[2] == MISSING_INDEX and new_user[0] > OOV_INDEX
    assert brand[0] == brand[2] == MISSING_INDEX and brand[1] > OOV_INDEX  # NULL brand
    assert segid[4] == MISSING_INDEX  # user 3 has no profile row
    assert segid[0] > OOV_INDEX


def test_vocabulary_is_built_on_train_only_with_oov_for_unseen_test_ids(taobao_dir, tmp_path):
    dm = _module(taobao_dir, tmp_path)
    spec = dm.feature_spec
    size = dict(zip(spec.sparse, spec.cardinalities, strict=True))
    assert size["adgroup_id"] == 2 + 2  # missing, OOV, ads 10 and 11 (12 is test-only)
    assert size["user"] == 2 + 3
    ads = _column(dm, "test", "adgroup_id")
    users = _column(dm, "test", "user")
    assert ads[0] == OOV_INDEX  # ad 12 never shown in train
    assert ads[1] == _column(dm, "train", "adgroup_id")[0]  # ad 10 keeps its train index
    assert users[2] == OOV_INDEX  # user 4 only appears on the test day
    cate = _column(dm, "test", "cate_id")
    assert cate[0] > OOV_INDEX  # ad 12's category was seen in train through ad 10


def test_min_count_sends_rare_ids_to_oov(taobao_dir, tmp_path):
    dm = _module(taobao_dir, tmp_path, min_count=3)
    assert _column(dm, "train", "adgroup_id") == [OOV_INDEX, 2, OOV_INDEX, 2, 2]


def test_price_is_log1p_standardized_on_train_and_time_is_not_an_input(taobao_dir, tmp_path):
    dm = _module(taobao_dir, tmp_path)
    assert dm.feature_spec.dense == ["price"]
    assert "time_stamp" not in dm.feature_spec.sparse
    train_prices = np.log1p([99.0, 1.0, 99.0, 1.0, 1.0])
    mean, std = train_prices.mean(), train_prices.std(ddof=1)
    expected = (train_prices - mean) / std
    assert torch.allclose(dm.data.train.dense[:, 0], torch.tensor(expected, dtype=torch.float32),
                          atol=1e-5)
    assert dm.data.test.dense[0, 0].item() == pytest.approx((math.log1p(1e4) - mean) / std,
                                                            rel=1e-5)


def test_second_setup_reads_the_cache_without_preprocessing(taobao_dir, tmp_path, monkeypatch):
    first = _module(taobao_dir, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again despite an unchanged config and sources")

    monkeypatch.setattr(TaobaoDataModule, "_preprocess", fail)
    second = _module(taobao_dir, tmp_path)
    assert torch.equal(first.data.train.sparse, second.data.train.sparse)
    # a changed config is a different cache entry
    with pytest.raises(AssertionError, match="preprocessed again"):
        _module(taobao_dir, tmp_path, min_count=2)


def test_min_client_samples_drops_small_clients(taobao_dir, tmp_path):
    dm = _module(taobao_dir, tmp_path, min_client_samples=2)
    assert dm.data.train.client_ids.tolist() == [1, 2]
    assert dm.data.info["dropped_clients"] == 1
    assert dm.data.info["num_train"] == 4


def test_missing_file_and_missing_column_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="raw_sample.csv: file not found"):
        _module(empty, tmp_path)
    broken = write_taobao(tmp_path / "broken", ads=AD_FEATURE.replace("brand,", "brnd,"))
    with pytest.raises(DataError, match=r"ad_feature.csv: missing column\(s\) brand"):
        _module(broken, tmp_path)
    headerless = write_taobao(tmp_path / "headerless", profile="")
    with pytest.raises(DataError, match="user_profile.csv: the file is empty"):
        _module(headerless, tmp_path)


def test_unknown_feature_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown feature 'age'"):
        TaobaoDataModule(sparse_features=["user", "age"])


def test_profile_header_with_trailing_space_is_read(taobao_dir):
    header = (taobao_dir / "user_profile.csv").read_text().splitlines()[0]
    assert header.endswith("new_user_class_level ")
    assert USER_PROFILE.splitlines()[0] == header


@pytest.mark.skipif(not REAL_EXCERPT.is_dir(), reason="shared/data excerpt not present")
def test_real_excerpt_loads_with_every_row_accounted_for(tmp_path):
    dm = _module(REAL_EXCERPT, tmp_path, validation_days=1)
    splits = (dm.data.train, dm.data.validation, dm.data.test)
    rows = pl.read_csv(REAL_EXCERPT / "raw_sample.csv").height
    assert sum(table.num_rows for table in splits) == rows
    assert all(table.num_rows > 0 for table in splits)
    assert int(sum(table.label.sum() for table in splits)) == pl.read_csv(
        REAL_EXCERPT / "raw_sample.csv")["clk"].sum()


def test_partitioner_replaces_the_user_split_on_the_same_cache(taobao_dir, tmp_path, monkeypatch):
    natural = _module(taobao_dir, tmp_path)
    monkeypatch.setattr(TaobaoDataModule, "_preprocess",
                        lambda *a, **k: pytest.fail("a partition change re-preprocessed"))
    dealt = _module(taobao_dir, tmp_path, partition="iid", num_clients=2, seed=3)
    train = dealt.data.train
    assert train.client_ids.tolist() == [0, 1]
    assert train.client_sizes().tolist() == [3, 2]  # 5 train rows dealt round-robin
    assert sorted(train.label.tolist()) == sorted(natural.data.train.label.tolist())
    assert dealt.data.test.num_rows == 3
    assert dealt.data.info["partition_num_clients"] == 2
    assert dealt.data.info["partition_size_max"] == 3


def test_unknown_partition_lists_the_choices():
    with pytest.raises(ValueError, match="data.partition must be one of .*'user'"):
        TaobaoDataModule(partition="key")
    with pytest.raises(ValueError, match="data.alpha"):
        TaobaoDataModule(partition="dirichlet", alpha=-1.0)


# The fixture plus a row of user 5 (no profile) on the validation day, showing ad 12 there:
# ad 12 and user 5 are then seen in validation, never in train.
VALIDATION_ONLY_ROW = f"5,{TEST_DAY_START - DAY + 60},12,430548_1007,0,1\n"


def test_validation_day_is_the_day_before_the_test_day(tmp_path):
    data = write_taobao(tmp_path / "data", raw=RAW_SAMPLE + VALIDATION_ONLY_ROW)
    dm = _module(data, tmp_path, validation_days=1)
    train, validation, test = dm.data.train, dm.data.validation, dm.data.test
    # days before the test day D: user 1 at D-5 and D-4, user 2 at D-2 (train) and at D-1 minus
    # one second (validation: 23:59:59 Beijing time), user 3 at D-3; user 5 at D-1.
    assert train.client_ids.tolist() == [1, 2, 3] and train.label.tolist() == [0, 1, 1, 0]
    assert validation.client_ids.tolist() == [2, 5] and validation.label.tolist() == [0, 1]
    assert test.client_ids.tolist() == [1, 2, 4] and test.label.tolist() == [0, 0, 1]
    assert dm.data.info["num_validation"] == 2


def test_validation_ids_unseen_in_train_are_oov_and_statistics_are_train_only(tmp_path):
    data = write_taobao(tmp_path / "data", raw=RAW_SAMPLE + VALIDATION_ONLY_ROW)
    dm = _module(data, tmp_path, validation_days=1)
    size = dict(zip(dm.feature_spec.sparse, dm.feature_spec.cardinalities, strict=True))
    assert size["adgroup_id"] == 2 + 2 and size["user"] == 2 + 3  # ads 10, 11; users 1, 2, 3
    assert _column(dm, "validation", "adgroup_id") == [_column(dm, "train", "adgroup_id")[1],
                                                       OOV_INDEX]  # ad 11; ad 12
    assert _column(dm, "validation", "user") == [_column(dm, "train", "user")[2], OOV_INDEX]
    assert _column(dm, "test", "adgroup_id")[0] == OOV_INDEX  # ad 12 is not learned from validation
    prices = np.log1p([99.0, 1.0, 99.0, 1.0])  # the train rows' ads: 10, 11, 10, 11
    mean, std = prices.mean(), prices.std(ddof=1)
    assert dm.data.validation.dense[0, 0].item() == pytest.approx((math.log1p(1.0) - mean) / std,
                                                                  rel=1e-5)
    # popularity on the train days: ads 10 and 11 both 1/2, unseen ad 12 the global 2/4: every
    # test row scores 0.5 (with the validation day counted, ad 11 would be 1/3: AUC 0)
    assert dm.data.info["baseline_auc"] == 0.5


def test_loaders_serve_validation_and_test_and_zero_days_means_no_validation(taobao_dir, tmp_path):
    split = _module(taobao_dir, tmp_path, validation_days=1)
    assert next(iter(split.val_dataloader())).label.tolist() == [0.0]  # user 2 at D-1
    assert next(iter(split.test_dataloader())).label.tolist() == [0.0, 0.0, 1.0]
    none = _module(taobao_dir, tmp_path, validation_days=0)
    assert none.data.validation is None and none.data.info["num_validation"] == 0
    assert none.data.train.num_rows == 5
    assert next(iter(none.val_dataloader())).label.tolist() == [0.0, 0.0, 1.0]  # the test split
    keys = {TaobaoDataModule(validation_days=days).cache_key(taobao_dir) for days in (0, 1, 2)}
    assert len(keys) == 3


def test_partitioner_deals_the_validation_rows_too(tmp_path):
    data = write_taobao(tmp_path / "data", raw=RAW_SAMPLE + VALIDATION_ONLY_ROW)
    dm = _module(data, tmp_path, validation_days=1, partition="iid", num_clients=2, seed=3)
    assert dm.data.validation.num_rows == 2
    assert dm.data.validation.client_ids.tolist() == [0, 1]  # one row each, round-robin
    assert sorted(dm.data.validation.label.tolist()) == [0.0, 1.0]


def test_default_is_one_validation_day_and_bad_values_name_the_key():
    assert TaobaoDataModule().validation_days == 1
    with pytest.raises(ValueError, match=r"^data.validation_days must be >= 0, got -1$"):
        TaobaoDataModule(validation_days=-1)


def test_impressions_of_the_same_second_keep_their_file_order(tmp_path):
    """A user's rows are sorted by time and then by their line in raw_sample.csv: the joins
    leave rows in an order that varied between runs, and ties then came out either way."""
    lines = [f"7,{TEST_DAY_START - DAY},{ad},430548_1007,1,0" for ad in (12, 10, 11)]
    raw = RAW_SAMPLE + "\n".join(lines) + "\n"
    dm = _module(write_taobao(tmp_path / "taobao", raw=raw), tmp_path)
    train = dm.data.train
    user = train.client_ids.tolist().index(7)
    rows = slice(int(train.offsets[user]), int(train.offsets[user + 1]))
    ads = train.sparse[rows, dm.feature_spec.sparse.index("adgroup_id")].tolist()
    # ids 10, 11, 12 are vocabulary indices 2, 3, 4: the file's order is 12, 10, 11
    assert ads == [4, 2, 3]


@pytest.mark.slow
def test_preprocessing_twice_gives_identical_files(tmp_path):
    """Same data, same config, fresh caches: the same bytes (before, one run in two put a
    user's same-second rows in another order and the price statistics differed in the last
    digit, so fresh machines trained on other inputs)."""
    from datamodules.synthetic import generate_taobao

    source = tmp_path / "source"
    generate_taobao(source, num_rows=100_000, seed=1)
    prepared = []
    for run in range(3):
        dm = TaobaoDataModule(data_dir=str(source), cache_dir=str(tmp_path / f"cache{run}"))
        dm.prepare_data()
        prepared.append(dm._prepared_dir())
    for split in ("train", "validation", "test"):
        frames = [pl.read_parquet(path / f"{split}.parquet") for path in prepared]
        assert all(frame.equals(frames[0]) for frame in frames[1:]), split
    metas = [json.loads((path / "meta.json").read_text()) for path in prepared]
    for key in ("price_log1p_mean", "price_log1p_std", "baseline_auc", "cardinalities"):
        assert all(meta[key] == metas[0][key] for meta in metas[1:]), key
