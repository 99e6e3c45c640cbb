"""Shared fixtures: a hand-written Taobao directory in the real format, and quiet warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")

# 2017-05-13 00:00 Beijing time (UTC+8) = 2017-05-12 16:00 UTC: the first second of the test day.
TEST_DAY_START = 1494604800
DAY = 86_400

RAW_SAMPLE = f"""user,time_stamp,adgroup_id,pid,nonclk,clk
1,{TEST_DAY_START - 5 * DAY},10,430548_1007,1,0
1,{TEST_DAY_START - 4 * DAY},11,430548_1007,0,1
1,{TEST_DAY_START + 3600},12,430539_1007,1,0
2,{TEST_DAY_START - 1},11,430539_1007,1,0
2,{TEST_DAY_START - 2 * DAY},10,430548_1007,0,1
2,{TEST_DAY_START},10,430548_1007,1,0
3,{TEST_DAY_START - 3 * DAY},11,430548_1007,1,0
4,{TEST_DAY_START + 7200},11,430548_1007,0,1
"""
# The real header ends in a space; user 2 has empty levels; user 3 has no profile at all.
USER_PROFILE = """userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,\
shopping_level,occupation,new_user_class_level 
1,0,5,2,5,2,3,0,3
2,13,1,1,1,,3,0,
4,0,8,2,2,1,3,0,2
"""
AD_FEATURE = """adgroup_id,cate_id,campaign_id,customer,brand,price
10,6261,387991,6881,NULL,99.0
11,4520,26240,49258,353787,1.0
12,6261,1,2,353787,10000.0
"""


def write_taobao(directory: Path, raw: str = RAW_SAMPLE, profile: str = USER_PROFILE,
                 ads: str = AD_FEATURE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "raw_sample.csv").write_text(raw)
    (directory / "user_profile.csv").write_text(profile)
    (directory / "ad_feature.csv").write_text(ads)
    return directory


@pytest.fixture
def taobao_dir(tmp_path: Path) -> Path:
    return write_taobao(tmp_path / "taobao")

# Small batches gain nothing from a second intra-op thread, and OpenMP spin-waits slow tests
# badly when the other core is busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """10k rows of synthetic Taobao data, prepared once for the whole session.

    No validation split (the loop then evaluates the test split): the tests' AUC thresholds
    were set with all seven days before the test day as training data.
    """
    from datamodules.taobao import TaobaoDataModule

    dm = TaobaoDataModule(num_rows=10_000, seed=0, validation_days=0,
                          cache_dir=str(tmp_path_factory.mktemp("fltk-cache")))
    dm.setup()
    return dm.data


@pytest.fixture(scope="session")
def synthetic_data_with_validation(tmp_path_factory):
    """The same 10k rows with the default validation day."""
    from datamodules.taobao import TaobaoDataModule

    dm = TaobaoDataModule(num_rows=10_000, seed=0,
                          cache_dir=str(tmp_path_factory.mktemp("fltk-cache")))
    dm.setup()
    return dm.data
