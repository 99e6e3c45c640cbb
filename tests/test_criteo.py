"""The Criteo pipeline on a hand-written train.txt in the real (Kaggle) format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from datamodules.base import DataError
from datamodules.criteo import CriteoDataModule
from datamodules.taobao import MISSING_INDEX, OOV_INDEX

REAL_HEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_head"

A, B, UNSEEN = "68fd1e64", "80e26c9b", "ffffffff"
FILLER = "25c83c98"


def _line(label: str, i1: str, c1: str, c2: str = FILLER, tail: bool = True) -> str:
    """One line: I1, C1 and C2 vary; without `tail`, C24..C26 are empty and get stripped."""
    ints = [i1, "5", "", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
    last = ["3a171ecb", "c5c50484", "e8b83407"] if tail else ["", "", ""]
    cats = [c1, c2, *[FILLER] * 21, *last]
    return "\t".join([label, *ints, *cats]).rstrip("\t")


# 12 lines: the first 9 are train with test_fraction 0.25. In train, C1 is A three times,
# B once and missing once; the test lines hold A, a value never seen in train, and a missing one.
LINES = [
    _line("0", "1", A, tail=False),  # a short first line (37 fields)
    _line("1", "-3", B, tail=False),  # negative integer
    _line("0", "", "", c2=""),  # empty integer and categories
    _line("0", "1382", A),
    _line("1", "0", A, tail=False),
    _line("0", "7", "", tail=False),
    _line("0", "2", "0000000a", c2=""),
    _line("1", "3", "0000000a"),
    _line("0", "4", "0000000b"),
    _line("1", "5", A),  # test from here on
    _line("0", "", UNSEEN, tail=False),
    _line("0", "6", ""),
]


@pytest.fixture
def criteo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "criteo"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(LINES))  # no final newline, like the real copy
    return folder


def _module(data_dir: Path, tmp_path: Path, **kwargs) -> CriteoDataModule:
    """The hand-worked expectations split train/test only: no validation unless asked for."""
    args = {"test_fraction": 0.25, "validation_fraction": 0.0, "num_clients": 1, **kwargs}
    dm = CriteoDataModule(data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **args)
    dm.setup()
    return dm


def _column(dm: CriteoDataModule, split: str, feature: str) -> list[int]:
    return getattr(dm.data, split).sparse[:, dm.feature_spec.sparse.index(feature)].tolist()


def test_fixture_has_the_real_quirks():
    assert sorted({line.count("\t") + 1 for line in LINES}) == [37, 40]


def test_split_by_line_order_and_dense_transform(criteo_dir, tmp_path):
    dm = _module(criteo_dir, tmp_path)
    train, test = dm.data.train, dm.data.test
    assert (train.num_rows, test.num_rows) == (9, 3)
    assert train.label.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0]  # one client keeps line order
    assert test.label.tolist() == [1, 0, 0]
    i1 = train.dense[:4, 0].tolist()
    assert i1 == pytest.approx([math.log(2), 0.0, 0.0, math.log(1383)])  # 1, -3, missing, 1382
    assert test.dense[1, 0].item() == 0.0
    assert train.dense[0, 2].item() == 0.0  # I3 is always empty
    assert dm.feature_spec.dense == [f"I{i}" for i in range(1, 14)]
    assert dm.feature_spec.sparse == [f"C{i}" for i in range(1, 27)]
    assert dm.feature_spec.label_mean == pytest.approx(3 / 9)


def test_train_only_vocabularies(criteo_dir, tmp_path):
    dm = _module(criteo_dir, tmp_path)
    # vocabulary of C1 (train): 0000000a, 0000000b, 68fd1e64 (A), 80e26c9b (B) -> 2..5
    assert _column(dm, "train", "C1") == [4, 5, MISSING_INDEX, 4, 4, MISSING_INDEX, 2, 2, 3]
    assert _column(dm, "test", "C1") == [4, OOV_INDEX, MISSING_INDEX]
    assert dm.feature_spec.cardinalities[0] == 6
    assert _column(dm, "train", "C26")[:4] == [MISSING_INDEX, MISSING_INDEX, 2, 2]  # stripped
    assert dm.feature_spec.cardinalities[2] == 3  # C3: only FILLER


def test_min_count_sends_rare_train_values_to_oov(criteo_dir, tmp_path):
    dm = _module(criteo_dir, tmp_path, min_count=2)
    # kept: 0000000a (2 times) -> 2, A (3 times) -> 3; B and 0000000b (once) -> OOV
    assert _column(dm, "train", "C1") == [3, OOV_INDEX, MISSING_INDEX, 3, 3, MISSING_INDEX,
                                          2, 2, OOV_INDEX]
    assert dm.feature_spec.cardinalities[0] == 4


def test_hashing_mode_is_deterministic(criteo_dir, tmp_path):
    sizes = [10] * 26
    dm = _module(criteo_dir, tmp_path, num_embeddings_per_feature=sizes)
    assert dm.feature_spec.cardinalities == sizes
    # 1 + int(hex, 16) % 9: A -> 8, B -> 3, ffffffff -> 4; missing stays 0
    assert _column(dm, "train", "C1")[:3] == [8, 3, MISSING_INDEX]
    assert _column(dm, "test", "C1") == [8, 4, MISSING_INDEX]
    again = _module(criteo_dir, tmp_path / "other", num_embeddings_per_feature=sizes)
    assert torch.equal(again.data.train.sparse, dm.data.train.sparse)
    assert int(dm.data.train.sparse.max()) < 10


def test_iid_partition_assigns_every_row(criteo_dir, tmp_path):
    dm = _module(criteo_dir, tmp_path, num_clients=3, seed=4)
    train, test = dm.data.train, dm.data.test
    assert train.client_ids.tolist() == [0, 1, 2]
    assert train.client_sizes().tolist() == [3, 3, 3]
    assert test.client_ids.tolist() == [0, 1, 2]  # every client has test rows to score
    info = dm.data.info
    assert info["partition_num_rows"] == 9
    assert info["partition_empty_clients"] == 0 and info["partition_size_gini"] == 0.0


def test_dirichlet_partition_keeps_all_rows(criteo_dir, tmp_path):
    dm = _module(criteo_dir, tmp_path, partition="dirichlet", num_clients=4, alpha=0.1)
    assert int(dm.data.train.client_sizes().sum()) == 9
    assert dm.data.train.num_clients <= 4
    assert dm.data.info["partition_num_clients"] == 4


def test_second_setup_reads_the_cache(criteo_dir, tmp_path, monkeypatch):
    first = _module(criteo_dir, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(CriteoDataModule, "_preprocess", fail)
    second = _module(criteo_dir, tmp_path, num_clients=2)  # the partition is not cached
    assert torch.equal(second.data.train.label.sort().values, first.data.train.label.sort().values)
    with pytest.raises(AssertionError, match="preprocessed again"):
        _module(criteo_dir, tmp_path, min_count=2)


def test_bad_label_is_a_one_line_error(criteo_dir, tmp_path):
    lines = list(LINES)
    lines[4] = "2" + lines[4][1:]
    (criteo_dir / "train.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"train.txt: line 5: label '2' is not 0 or 1") as err:
        _module(criteo_dir, tmp_path)
    assert "\n" not in str(err.value)


def test_line_with_too_many_fields_is_a_one_line_error(criteo_dir, tmp_path):
    (criteo_dir / "train.txt").write_text("\n".join([*LINES, _line("0", "1", A) + "\textra"]))
    with pytest.raises(DataError, match="cannot parse") as err:
        _module(criteo_dir, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("line", "value"), [(7, "abc"), (13, "1.5")])
def test_non_integer_names_its_line_and_column(criteo_dir, tmp_path, line, value):
    lines = [*LINES, _line("0", "1", A)]
    fields = lines[line - 1].split("\t")
    fields[3] = value  # I3
    lines[line - 1] = "\t".join(fields)
    (criteo_dir / "train.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"train.txt: line {line}: I3 '{value}' is not an "
                       "integer$"):
        _module(criteo_dir, tmp_path)


def test_byte_order_mark_loads_like_the_plain_file(criteo_dir, tmp_path):
    plain = _module(criteo_dir, tmp_path / "plain")
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "train.txt").write_bytes(b"\xef\xbb\xbf" + (criteo_dir / "train.txt").read_bytes())
    dm = _module(marked, tmp_path / "marked-cache")
    for split in ("train", "test"):
        for field in ("sparse", "dense", "label", "offsets", "client_ids"):
            assert torch.equal(getattr(getattr(dm.data, split), field),
                               getattr(getattr(plain.data, split), field)), (split, field)


def test_a_byte_order_mark_after_the_first_line_is_still_a_bad_label(criteo_dir, tmp_path):
    lines = list(LINES)
    lines[2] = "\ufeff" + lines[2]
    (criteo_dir / "train.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"train.txt: line 3: label '\\ufeff0' is not 0 or 1"):
        _module(criteo_dir, tmp_path)


def test_unreadable_bytes_name_the_line_in_one_line(criteo_dir, tmp_path):
    lines = [line.encode() for line in LINES]
    lines[4] = lines[4].replace(A.encode(), b"68fd\xe9e64")
    (criteo_dir / "train.txt").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as err:
        _module(criteo_dir, tmp_path)
    column = lines[4].index(b"\xe9")
    assert str(err.value) == (f"{criteo_dir / 'train.txt'}: line 5 is not UTF-8 text "
                              f"(byte 0xe9 at position {column + 1} of the line)")


def test_validation_is_the_end_of_the_lines_before_the_test_lines(criteo_dir, tmp_path):
    dm = _module(criteo_dir, tmp_path, validation_fraction=1 / 3)
    train, validation, test = dm.data.train, dm.data.validation, dm.data.test
    # 9 lines before the test lines: 6 train (i < 2/3 * 9), lines 7-9 validation, 10-12 test
    assert train.label.tolist() == [0, 1, 0, 0, 1, 0]
    assert validation.label.tolist() == [0, 1, 0]
    assert test.label.tolist() == [1, 0, 0]
    assert dm.data.info["num_validation"] == 3
    assert dm.feature_spec.label_mean == pytest.approx(2 / 6)
    # C1 in train: A, B, missing -> vocabulary A -> 2, B -> 3; 0000000a/b only in validation
    assert _column(dm, "train", "C1") == [2, 3, MISSING_INDEX, 2, 2, MISSING_INDEX]
    assert _column(dm, "validation", "C1") == [OOV_INDEX] * 3
    assert _column(dm, "test", "C1") == [2, OOV_INDEX, MISSING_INDEX]
    assert dm.feature_spec.cardinalities[0] == 4
    assert next(iter(dm.val_dataloader())).label.tolist() == [0, 1, 0]
    assert next(iter(dm.test_dataloader())).label.tolist() == [1, 0, 0]


def test_zero_validation_fraction_means_no_validation_split(criteo_dir, tmp_path, monkeypatch):
    dm = _module(criteo_dir, tmp_path, validation_fraction=0.0)
    assert dm.data.validation is None and dm.data.info["num_validation"] == 0
    assert next(iter(dm.val_dataloader())).label.tolist() == [1, 0, 0]  # the test split
    monkeypatch.setattr(CriteoDataModule, "_preprocess",
                        lambda *a, **k: pytest.fail("preprocessed again"))
    with pytest.raises(pytest.fail.Exception, match="preprocessed again"):
        _module(criteo_dir, tmp_path, validation_fraction=0.2)  # a cache entry of its own


def test_default_validation_fraction_and_an_empty_validation_split(criteo_dir, tmp_path):
    assert CriteoDataModule().validation_fraction == 0.1
    # 9 lines before the test lines: 0.1 of them rounds to no validation line at all
    with pytest.raises(DataError, match="no validation rows left"):
        _module(criteo_dir, tmp_path, validation_fraction=0.1)


def test_missing_train_file(tmp_path):
    with pytest.raises(DataError, match=r"train.txt: file not found"):
        _module(tmp_path, tmp_path)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"test_fraction": 1.0}, "data.test_fraction"),
    ({"validation_fraction": 1.0}, "data.validation_fraction"),
    ({"validation_fraction": -0.1}, "data.validation_fraction"),
    ({"min_count": 0}, "data.min_count"),
    ({"num_embeddings_per_feature": [10] * 25}, "data.num_embeddings_per_feature"),
    ({"num_embeddings_per_feature": [10] * 26, "min_count": 3}, "data.min_count"),
    ({"partition": "key"}, "data.partition"),
    ({"num_clients": 0}, "data.num_clients"),
    ({"partition": "dirichlet", "alpha": 0.0}, "data.alpha"),
])
def test_bad_arguments_name_the_option(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        CriteoDataModule(data_dir=str(tmp_path), **kwargs)


@pytest.mark.skipif(not (REAL_HEAD / "train_head.txt").is_file(), reason="no Criteo excerpt")
def test_real_head_end_to_end(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "train.txt").symlink_to(REAL_HEAD / "train_head.txt")
    dm = CriteoDataModule(data_dir=str(folder), cache_dir=str(tmp_path / "cache"),
                          num_clients=10)
    dm.setup()
    train, validation, test = dm.data.train, dm.data.validation, dm.data.test
    assert (train.num_rows, validation.num_rows, test.num_rows) == (810, 90, 100)
    assert train.num_clients == validation.num_clients == test.num_clients == 10
    for table in (train, validation, test):
        assert not torch.isnan(table.dense).any()
        assert set(table.label.unique().tolist()) <= {0.0, 1.0}
        assert (table.sparse >= 0).all()
        assert (table.sparse < torch.tensor(dm.feature_spec.cardinalities)).all()
    assert 0.0 < dm.feature_spec.label_mean < 1.0
