"""The synthetic Taobao generator: real format, determinism, and an oracle AUC that is what its
own click probabilities give."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from datamodules.synthetic import TEST_START, TIME_END, TIME_START, build_world, generate_taobao
from tests.test_metrics import brute_force_auc

ROWS = 12_000


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    meta = generate_taobao(out, num_rows=ROWS, seed=3)
    return out, meta


def test_files_have_the_real_headers_and_missing_values(generated):
    out, _ = generated
    assert (out / "raw_sample.csv").read_text().splitlines()[0] == \
        "user,time_stamp,adgroup_id,pid,nonclk,clk"
    profile_header = (out / "user_profile.csv").read_text().splitlines()[0]
    assert profile_header == ("userid,cms_segid,cms_group_id,final_gender_code,age_level,"
                              "pvalue_level,shopping_level,occupation,new_user_class_level ")
    assert (out / "ad_feature.csv").read_text().splitlines()[0] == \
        "adgroup_id,cate_id,campaign_id,customer,brand,price"
    ads = pl.read_csv(out / "ad_feature.csv", infer_schema=False)
    assert (ads["brand"] == "NULL").any()
    profile = pl.read_csv(out / "user_profile.csv", infer_schema=False)
    assert profile["pvalue_level"].is_null().any()
    assert profile["new_user_class_level "].is_null().any()
    raw = pl.read_csv(out / "raw_sample.csv")
    users = set(raw["user"].unique().to_list())
    assert not users <= set(profile["userid"].cast(pl.Int64).to_list())  # some lack a profile
    assert (raw["nonclk"] == 1 - raw["clk"]).all()
    assert set(raw["pid"].unique().to_list()) <= {"430548_1007", "430539_1007"}


def test_marginals_are_plausible(generated):
    out, meta = generated
    raw = pl.read_csv(out / "raw_sample.csv")
    assert raw.height == ROWS
    assert 0.04 <= raw["clk"].mean() <= 0.06
    assert raw["time_stamp"].min() >= TIME_START and raw["time_stamp"].max() < TIME_END
    test_fraction = (raw["time_stamp"] >= TEST_START).mean()
    assert 0.08 < test_fraction < 0.2
    per_user = raw.group_by("user").len()["len"]
    assert per_user.min() >= 1 and per_user.max() > 5 * per_user.median()  # heavy tail
    assert meta["num_test"] == int((raw["time_stamp"] >= TEST_START).sum())


def test_same_seed_same_bytes_other_seed_other_data(generated, tmp_path):
    out, _ = generated
    generate_taobao(tmp_path / "again", num_rows=ROWS, seed=3, chunk_rows=5000)
    generate_taobao(tmp_path / "other", num_rows=ROWS, seed=4)
    for name in ("raw_sample.csv", "user_profile.csv", "ad_feature.csv"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (out / "raw_sample.csv").read_bytes() != (tmp_path / "other" / "raw_sample.csv"
                                                      ).read_bytes()


def test_oracle_auc_is_the_auc_of_the_true_probabilities(generated):
    out, meta = generated
    raw = pl.read_csv(out / "raw_sample.csv").filter(pl.col("time_stamp") >= TEST_START)
    world = build_world(ROWS, seed=3)
    probability = world.click_probability(raw["user"].to_numpy(), raw["adgroup_id"].to_numpy(),
                                          raw["pid"].to_numpy())
    labels = raw["clk"].to_numpy()
    # brute force over a subsample of pairs would be slow on all rows: use every positive
    # against every negative of the test day (a few hundred x a few thousand pairs)
    expected = brute_force_auc(probability.tolist(), labels.tolist())
    assert meta["oracle_auc"] == pytest.approx(expected, abs=1e-9)
    assert json.loads((out / "synthetic_meta.json").read_text())["oracle_auc"] == \
        meta["oracle_auc"]


def test_personalization_matters(generated):
    _, meta = generated
    assert meta["oracle_auc"] - meta["popularity_auc"] >= 0.05


def test_too_few_rows_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="num_rows must be at least 1000"):
        generate_taobao(tmp_path, num_rows=10)


def test_world_probabilities_are_valid():
    world = build_world(ROWS, seed=0)
    p = world.probability(np.arange(10), np.arange(10), np.zeros(10, dtype=int))
    assert ((p > 0) & (p < 1)).all()
