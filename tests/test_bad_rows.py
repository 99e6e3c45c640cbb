"""Malformed rows in the Taobao CSVs: one clear error line by default, or dropped with `skip`."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.base import DataError
from datamodules.clients import ClientTable
from datamodules.taobao import FIRST_VOCAB_INDEX, OOV_INDEX, TaobaoDataModule
from tests.conftest import AD_FEATURE, DAY, RAW_SAMPLE, TEST_DAY_START, USER_PROFILE, write_taobao

UTC_OFFSET = 8 * 3600  # the loader's default day boundaries: Beijing time


def _module(data_dir: Path, cache: Path, **kwargs) -> TaobaoDataModule:
    """Train and test only: the expected rows below are split by the last day alone."""
    dm = TaobaoDataModule(data_dir=str(data_dir), cache_dir=str(cache),
                          sparse_features=["user", "adgroup_id", "pvalue_level", "brand"],
                          validation_days=0, **kwargs)
    dm.setup()
    return dm


def _assert_same_tables(want: TaobaoDataModule, got: TaobaoDataModule) -> None:
    for split in ("train", "test"):
        for field in ("sparse", "dense", "label", "offsets", "client_ids"):
            assert torch.equal(getattr(getattr(want.data, split), field),
                               getattr(getattr(got.data, split), field)), (split, field)


def _insert(content: str, lines: dict[int, str]) -> str:
    """`content` with each extra line placed so that it becomes line number `key` of the file."""
    rows = content.splitlines()
    for number in sorted(lines):
        rows.insert(number - 1, lines[number])
    return "\n".join(rows) + "\n"


BAD_KINDS = {
    "wrong column count": ("raw", "1,1494604800,10", "expected 6 fields, got 3"),
    "non-numeric id": ("raw", "u1,1494604800,10,430548_1007,1,0", 'user: not an integer: "u1"'),
    "unparsable timestamp": ("raw", "1,2017-05-13 10:00,10,430548_1007,1,0",
                             'time_stamp: not an integer: "2017-05-13 10:00"'),
    "bad price": ("ads", "13,6261,1,2,NULL,cheap", 'price: not a number >= 0: "cheap"'),
    "bad click flag": ("raw", "1,1494604800,10,430548_1007,0,2", 'clk: not 0 or 1: "2"'),
    "bad level": ("profile", "5,0,5,2,high,,3,0,", 'age_level: not an integer: "high"'),
}
FILES = {"raw": "raw_sample.csv", "profile": "user_profile.csv", "ads": "ad_feature.csv"}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_error_names_file_line_and_reason_in_one_line(kind, tmp_path):
    which, line, reason = BAD_KINDS[kind]
    contents = {"raw": RAW_SAMPLE, "profile": USER_PROFILE, "ads": AD_FEATURE}
    contents[which] = _insert(contents[which], {3: line})
    data = write_taobao(tmp_path / "data", **contents)
    with pytest.raises(DataError) as caught:
        _module(data, tmp_path / "cache")
    message = str(caught.value)
    assert message == (f"{data / FILES[which]}: 1 malformed row(s) (first at line 3: {reason}); "
                       "fix the file or set --data.on_bad_rows skip")
    assert len(message.splitlines()) == 1


def test_count_and_first_line_cover_all_bad_rows_and_values_are_escaped(tmp_path):
    raw = _insert(RAW_SAMPLE, {4: "1,1494604800,\u2028\t,x,1,0", 6: "garbage", 9: "1,2"})
    data = write_taobao(tmp_path / "data", raw=raw)
    with pytest.raises(DataError, match=re.escape(
            '3 malformed row(s) (first at line 4: adgroup_id: not an integer: "\\u2028")')) as err:
        _module(data, tmp_path / "cache")
    assert len(str(err.value).splitlines()) == 1


def test_missing_values_and_blank_lines_are_not_malformed(tmp_path):
    # the fixture already has empty levels and a NULL brand; add blank lines and padded fields
    raw = _insert(RAW_SAMPLE, {2: "", 5: " \t", 7: " 4 , 1494612000 ,11, 430548_1007,0,1"})
    dm = _module(write_taobao(tmp_path / "data", raw=raw), tmp_path / "cache")
    assert dm.data.test.num_rows == 4
    assert "bad_rows_skipped" not in dm.data.info  # the error policy never skips


@pytest.mark.parametrize("name", list(FILES.values()))
def test_unreadable_bytes_name_the_file_and_line_in_one_line(tmp_path, name):
    data = write_taobao(tmp_path / "data")
    text = (data / name).read_bytes().splitlines(keepends=True)
    text.insert(2, b"1,\xe9t\xe9,10,x,1,0\n")  # Latin-1 "ete": line 3 is not UTF-8
    (data / name).write_bytes(b"".join(text))
    with pytest.raises(DataError) as err:
        _module(data, tmp_path / "cache")
    assert str(err.value) == (f"{data / name}: line 3 is not UTF-8 text "
                              "(byte 0xe9 at position 3 of the line)")


@pytest.mark.parametrize("name", list(FILES.values()))
def test_byte_order_mark_loads_like_the_plain_file(tmp_path, name):
    """Spreadsheet tools save CSVs with a UTF-8 byte-order mark; the mark is not data."""
    plain = _module(write_taobao(tmp_path / "plain"), tmp_path / "cache")
    marked = write_taobao(tmp_path / "marked")
    (marked / name).write_bytes(b"\xef\xbb\xbf" + (marked / name).read_bytes())
    _assert_same_tables(plain, _module(marked, tmp_path / "cache"))


def test_skip_drops_bad_rows_and_loads_the_rest_like_a_clean_file(tmp_path, caplog):
    clean = _module(write_taobao(tmp_path / "clean"), tmp_path / "cache")
    dirty = write_taobao(
        tmp_path / "dirty",
        raw=_insert(RAW_SAMPLE, {3: "1,2,3", 5: "x,1494604800,10,p,1,0", 11: "1,1,10,p,1,0,9"}),
        profile=_insert(USER_PROFILE, {2: "9,0,5,2,5,2,3,zero,3"}),
        ads=_insert(AD_FEATURE, {4: "13,6261,1,2,NULL,-1"}),
    )
    with caplog.at_level(logging.WARNING, logger="fltk.data"):
        skipped = _module(dirty, tmp_path / "cache", on_bad_rows="skip")
    _assert_same_tables(clean, skipped)
    assert skipped.data.info["bad_rows_skipped"] == {
        "raw_sample.csv": 3, "user_profile.csv": 1, "ad_feature.csv": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{dirty / 'raw_sample.csv'}: skipped 3 malformed row(s) "
        "(first at line 3: expected 6 fields, got 3)",
        f"{dirty / 'user_profile.csv'}: skipped 1 malformed row(s) "
        '(first at line 2: occupation: not an integer: "zero")',
        f"{dirty / 'ad_feature.csv'}: skipped 1 malformed row(s) "
        '(first at line 4: price: not a number >= 0: "-1")',
    ]


def test_the_policy_is_part_of_the_cache_key(tmp_path):
    dirty = write_taobao(tmp_path / "dirty", raw=_insert(RAW_SAMPLE, {3: "1,2,3"}))
    _module(dirty, tmp_path / "cache", on_bad_rows="skip")
    with pytest.raises(DataError, match="1 malformed row"):  # the skip-run's cache is not used
        _module(dirty, tmp_path / "cache")
    source = write_taobao(tmp_path / "clean")
    keys = {TaobaoDataModule(on_bad_rows=policy).cache_key(source) for policy in ("error", "skip")}
    assert len(keys) == 2


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="on_bad_rows must be 'error' or 'skip'"):
        TaobaoDataModule(on_bad_rows="ignore")


# ---------------------------------------------------------------- property-based
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBER_TEXT = "0123456789+-.eE"
_FUZZ_ALPHABET = _NUMBER_TEXT + "abxyzNUL_ ,\t\"'é\u2028"


def _expected_row(line: str) -> tuple[int, int, int, int] | None:
    """(user, time_stamp, adgroup_id, clk) of a well-formed raw_sample line, by the format's
    rules written out independently of the loader; None for a malformed line."""
    fields = [f.strip(" \t") for f in line.split(",")]
    if len(fields) != 6:
        return None
    user, time_stamp, adgroup, _pid, nonclk, clk = fields
    ints = [user, time_stamp, adgroup, nonclk, clk]
    if not all(_INTEGER.fullmatch(v) and -(2**63) <= int(v) < 2**63 for v in ints):
        return None
    if int(nonclk) not in (0, 1) or int(clk) not in (0, 1):
        return None
    return int(user), int(time_stamp), int(adgroup), int(clk)


@st.composite
def _valid_row(draw: st.DrawFn) -> str:
    """A well-formed raw_sample line on one of the fixture's days, fields padded at random."""
    values = [
        draw(st.integers(1, 6)),
        draw(st.integers(TEST_DAY_START - 3 * DAY, TEST_DAY_START + DAY - 1)),
        draw(st.sampled_from([10, 11, 12, 13])),
        draw(st.sampled_from(["430548_1007", "", "NULL", "p é"])),
        draw(st.integers(0, 1)),
        draw(st.integers(0, 1)),
    ]
    pad = st.sampled_from(["", "", " ", "\t"])
    return ",".join(f"{draw(pad)}{value}{draw(pad)}" for value in values)


_token = st.text(_FUZZ_ALPHABET.replace(",", ""), max_size=8)  # short: numbers stay in int64
# values on both sides of the rules: flags, signs, padding, floats and missing-value tokens
_edge_token = st.sampled_from(["0", "1", "2", "-1", "+1", "-0", "01", " 1\t", "1.0", "1e3",
                               ".", "", "NULL", "null", "x"])


@st.composite
def _replaced_field(draw: st.DrawFn) -> str:
    """A valid row with one field replaced by an edge-case or random token."""
    fields = draw(_valid_row()).split(",")
    at = draw(st.sampled_from(range(len(fields))))
    fields[at] = draw(st.one_of(_edge_token, _token, st.text(_NUMBER_TEXT, max_size=6)))
    return ",".join(fields)


@st.composite
def _resized_row(draw: st.DrawFn) -> str:
    """A valid row with a field dropped or a random one added."""
    fields = draw(_valid_row()).split(",")
    if draw(st.booleans()):
        del fields[draw(st.sampled_from(range(len(fields))))]
    else:
        fields.insert(draw(st.sampled_from(range(len(fields) + 1))), draw(_token))
    return ",".join(fields)


_extra_line = st.one_of(
    _replaced_field(),
    _valid_row(),
    _resized_row(),
    st.lists(_token, max_size=8).map(",".join),  # random text, any number of fields
)


def _decoded(table: ClientTable, adgroup_column: int) -> list[tuple[int, int, int]]:
    """(user, adgroup index, click) of every row, sorted (the loader orders by user and time)."""
    users = table.client_ids[table.row_clients()].tolist()
    ads = table.sparse[:, adgroup_column].tolist()
    return sorted(zip(users, ads, [int(x) for x in table.label.tolist()], strict=True))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.lists(st.tuples(st.integers(0, 20), _extra_line), max_size=8),
       policy=st.sampled_from(["error", "skip"]))
def test_loader_reads_exactly_the_valid_rows_or_fails_in_one_line(extra, policy):
    lines = RAW_SAMPLE.splitlines()
    for position, line in extra:
        lines.insert(1 + position % len(lines), line)  # never before the header
    expected = {number: _expected_row(line) for number, line in enumerate(lines[1:], start=2)
                if line.strip(" \t")}
    bad_lines = sorted(number for number, row in expected.items() if row is None)
    rows = [row for row in expected.values() if row is not None]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_taobao(Path(tmp) / "data", raw="\n".join(lines) + "\n")
        if policy == "error" and bad_lines:
            with pytest.raises(DataError) as caught:
                _module(data, Path(tmp) / "cache", on_bad_rows=policy)
            message = str(caught.value)
            assert len(message.splitlines()) == 1
            assert message.startswith(f"{data / 'raw_sample.csv'}: {len(bad_lines)} malformed "
                                      f"row(s) (first at line {bad_lines[0]}: ")
            return
        dm = _module(data, Path(tmp) / "cache", on_bad_rows=policy)

    def day(time_stamp: int) -> int:
        return (time_stamp + UTC_OFFSET) // DAY

    last_day = max(day(row[1]) for row in rows)
    train = [row for row in rows if day(row[1]) < last_day]
    test = [row for row in rows if day(row[1]) == last_day]
    vocab = {ad: FIRST_VOCAB_INDEX + i for i, ad in enumerate(sorted({r[2] for r in train}))}
    column = dm.feature_spec.sparse.index("adgroup_id")
    for table, want in ((dm.data.train, train), (dm.data.test, test)):
        assert _decoded(table, column) == sorted(
            (user, vocab.get(ad, OOV_INDEX), clk) for user, _, ad, clk in want)
    if policy == "skip":
        assert dm.data.info["bad_rows_skipped"]["raw_sample.csv"] == len(bad_lines)
