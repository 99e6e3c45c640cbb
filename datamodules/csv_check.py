"""Row-level validation of a headed, comma-separated file, vectorized with polars.

Why: polars' typed CSV reader stops at the first malformed row with a long traceback, and its
lenient options turn bad values into nulls that look like honest missing values. Here every line
is split on commas as text, each column is cast strictly, and a row that breaks a rule is flagged
with the first column it breaks, so the caller can fail with one clear line or drop the row.
Fields are unquoted (the Taobao format has no quoting); blank lines are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from datamodules.base import DataError
from datamodules.utf8_lines import non_utf8_line

MISSING_TOKENS = ["", "NULL"]  # what a column that allows missing values may hold instead
BLANK = " \t"  # stripped around every field and used to recognise blank lines
FIELD_COUNT = "<field count>"  # the `_problem` of a row whose field count differs from the header
_SHOWN_CHARS = 40  # longest offending value quoted in a message


@dataclass(frozen=True)
class Rule:
    """How one column must read: the type it is cast to and what its values must satisfy.

    Attributes:
        dtype: polars type the text is cast to; a value the cast rejects breaks the rule.
        problem: what a breaking value is not, for messages (e.g. "not an integer").
        missing_ok: the column may hold one of MISSING_TOKENS, read as null.
        accept: further condition on the cast value (e.g. a 0/1 flag), if any.
    """

    dtype: pl.DataType
    problem: str
    missing_ok: bool = False
    accept: Callable[[pl.Expr], pl.Expr] | None = None


@dataclass(frozen=True)
class CheckedCsv:
    """A checked file: its rows in a parquet file, and what was wrong with the bad ones."""

    parquet: Path
    columns: list[str]
    bad_rows: int
    first_bad_line: int | None  # 1-based line in the source file (the header is line 1)
    first_reason: str | None

    def good_rows(self) -> pl.LazyFrame:
        """The rows that broke no rule, with the checked columns cast to their types."""
        return (pl.scan_parquet(self.parquet).filter(pl.col("_problem").is_null())
                .select(self.columns))


def check_csv(path: Path, header: list[str], rules: dict[str, Rule], parquet: Path) -> CheckedCsv:
    """Check every data line of `path` in one pass, writing the parsed rows to `parquet`.

    `header` is the file's stripped header; each ruled column is read at its position there and
    a row must have as many fields as the header.
    """
    position = {name: header.index(name) for name in rules}
    text = {name: f"_text_{name}" for name in rules}
    fields = pl.col("_fields")
    problem = pl.when(fields.list.len() != len(header)).then(pl.lit(FIELD_COUNT))
    for name, rule in rules.items():
        problem = problem.when(_breaks(pl.col(text[name]), pl.col(name), rule)).then(pl.lit(name))
    # One stage per step, so that no split, strip or cast is computed twice.
    rows = (
        pl.scan_lines(path, name="_line_text", row_index_name="_line", row_index_offset=1)
        .filter(pl.col("_line") > 1, pl.col("_line_text").str.strip_chars(BLANK) != "")
        .with_columns(pl.col("_line_text").str.split(",").alias("_fields"))
        .with_columns(fields.list.get(position[name], null_on_oob=True).str.strip_chars(BLANK)
                      .alias(text[name]) for name in rules)
        .with_columns(_cast(pl.col(text[name]), rule).alias(name) for name, rule in rules.items())
        .with_columns(problem.otherwise(None).alias("_problem"))
        .select("_line", "_problem",
                pl.when(pl.col("_problem").is_not_null()).then("_line_text").alias("_bad_text"),
                *rules)
    )
    try:
        rows.sink_parquet(parquet, compression="lz4")  # a scratch file: speed over size
    except pl.exceptions.ComputeError as err:  # e.g. bytes that are not UTF-8
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: {non_utf8_line(path) or f'could not be read ({detail})'}"
                        ) from err
    summary = (pl.scan_parquet(parquet).filter(pl.col("_problem").is_not_null())
               .select(pl.len().alias("count"), pl.col("_line", "_problem", "_bad_text").first())
               .collect().row(0, named=True))
    reason = None
    if summary["count"]:
        reason = _reason(summary["_problem"], summary["_bad_text"], header, position, rules)
    return CheckedCsv(parquet, list(rules), summary["count"], summary["_line"], reason)


def _cast(value: pl.Expr, rule: Rule) -> pl.Expr:
    """The field cast to the rule's type; null where it is missing or does not parse."""
    cast = value.cast(rule.dtype, strict=False)
    if rule.missing_ok:
        return pl.when(value.is_in(MISSING_TOKENS)).then(None).otherwise(cast)
    return cast


def _breaks(value: pl.Expr, cast: pl.Expr, rule: Rule) -> pl.Expr:
    """True where a present field failed the cast or the rule's condition."""
    broken = cast.is_null()
    if rule.accept is not None:
        broken = broken | ~rule.accept(cast)
    if rule.missing_ok:
        broken = broken & ~value.is_in(MISSING_TOKENS)
    return broken


def _reason(problem: str, text: str, header: list[str], position: dict[str, int],
            rules: dict[str, Rule]) -> str:
    """One line saying why the first bad row is bad (its value quoted and escaped)."""
    fields = text.split(",")
    if problem == FIELD_COUNT:
        return f"expected {len(header)} fields, got {len(fields)}"
    value = fields[position[problem]].strip(BLANK)
    if len(value) > _SHOWN_CHARS:
        value = value[:_SHOWN_CHARS] + "..."
    return f"{problem}: {rules[problem].problem}: {json.dumps(value)}"
