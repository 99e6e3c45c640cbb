"""A run's report, and a comparison of runs, each as a Markdown file and a self-contained HTML file.

Both files are rendered from one `Document` (a title and a list of blocks), so the Markdown and
the HTML can never say different things. The HTML embeds its plots as data URIs and carries its
own CSS, so it is a single file that can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from fltoolkit.reports.record import RunRecord

# Keys of summary.json (or of the last evaluation) shown for a run, in this order.
ABOUT_STRATEGY = ("mode", "federated_mode", "strategy")  # the strategy's hyper-parameters follow
ABOUT_RUN = ("selector", "rounds", "epochs", "clients_per_round", "local_tables",
             "num_train", "num_validation", "num_test", "num_clients", "model_parameters")
FINAL_METRICS = ("auc", "logloss", "ne", "gauc", "calibration", "evaluated_on", "best_round",
                 "best_validation_auc", "sim_time_s", "wall_time_s",
                 "clients_seen", "bytes_up_total", "bytes_down_total", "target_auc",
                 "rounds_to_target", "time_to_target")
COMPARED = ("mode", "strategy", "selector", "rounds", "auc", "logloss", "gauc", "calibration",
            "sim_time_s", "time_to_target", "wall_time_s")
CONFIG_SECTIONS = ("model", "federated", "systems", "data")
# Async runs: (label, summary key) of the server's settings, (label, rounds.csv column) of
# what was counted over the run.
ASYNC_SETTINGS = (("concurrency", "concurrency"), ("buffer size", "buffer_size"))
ASYNC_TOTALS = (("updates lost (client offline)", "dropped"),
                ("dropped as stale", "dropped_stale"))
# (summary key, label, what the reference is): AUCs a run is measured against, when known.
REFERENCES = (("oracle_auc", "oracle AUC", "planted model"),
              ("baseline_auc", "popularity baseline AUC", "item click rate"),
              ("centralized_auc", "centralized AUC", "same model on pooled data"))
FOUR_DECIMALS = frozenset({"auc", "logloss", "ne", "gauc", "calibration"})
# (label, server_learns key): what crossed from the clients to the server, in this order.
SERVER_LEARNS = (("receives", "server_receives"), ("row ids", "row_ids"),
                 ("in the clear per client", "per_client_in_clear"),
                 ("tables uploaded", "tables_uploaded"), ("tables kept local", "tables_local"),
                 ("local tables stay local", "local_tables_stay_local"),
                 ("rows received per round", "rows_received_per_round"),
                 ("bytes received per round", "bytes_received_per_round"))

CSS = """
body { max-width: 1000px; margin: 2em auto; padding: 0 1em; line-height: 1.45;
       font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em;
        display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left;
         font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 0.7em; overflow-x: auto; }
figure { margin: 1em 0 2em; }
img { width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { text-align: center; font-style: italic; color: #555; }
.warning { background: #fdecea; border-left: 5px solid #c62828; padding: 0.6em 0.9em;
           color: #7f1d1d; }
"""


class PlotLike(Protocol):
    """A plot made elsewhere; declared here so reports do not depend on how plots are drawn."""

    title: str
    path: Path  # a PNG file


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Alert:
    """A paragraph a reader must not skim past (a claim that does not hold)."""

    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Preformatted:
    text: str


@dataclass(frozen=True)
class Image:
    caption: str
    path: Path


Block = Heading | Paragraph | Alert | Table | Preformatted | Image


@dataclass(frozen=True)
class Document:
    """What a report says, independent of the format it is written in."""

    title: str
    blocks: list[Block]


def write_run_report(record: RunRecord, plots: Sequence[PlotLike]) -> tuple[Path, Path]:
    """Writes record.path / "report.md" and record.path / "report.html"; returns both paths."""
    return _write(_run_document(record, plots), record.path, "report")


def write_comparison(records: Sequence[RunRecord], plots: Sequence[PlotLike],
                     out_dir: Path) -> tuple[Path, Path]:
    """Writes out_dir / "comparison.md" and out_dir / "comparison.html"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(_comparison_document(records, plots), out_dir, "comparison")


def _write(document: Document, directory: Path, stem: str) -> tuple[Path, Path]:
    markdown, page = directory / f"{stem}.md", directory / f"{stem}.html"
    markdown.write_text(_markdown(document, directory), encoding="utf-8")
    page.write_text(_html(document), encoding="utf-8")
    return markdown, page


# ---- content ----------------------------------------------------------------------------------

def _run_document(record: RunRecord, plots: Sequence[PlotLike]) -> Document:
    facts = record.final()
    # results first, then how they were obtained (the hyper-parameter tables run long)
    return Document(f"{record.name} ({_status(record)})",
                    [*_section("Final metrics", ("metric", "value"),
                               _present(facts, FINAL_METRICS)),
                     *_references(facts), *_server_learns(facts), *_what_ran(facts),
                     *_asynchronous(record), *_figures(plots),
                     *_hyperparameters(record.config)])


def _comparison_document(records: Sequence[RunRecord], plots: Sequence[PlotLike]) -> Document:
    rows = [(_label(record), *_cells({**record.final(), "mode": _mode(record)}, COMPARED))
            for record in records]
    return Document(f"Comparison of {len(records)} runs",
                    [Heading("Runs"), Table(("run", *COMPARED), rows), *_figures(plots)])


def _mode(record: RunRecord) -> str:
    """How a run trained, told apart down to sync and async federated rounds, so a comparison
    of the two says which is which."""
    if record.federated_mode is None:
        return str(record.final().get("mode", "centralized"))
    return f"federated ({record.federated_mode})"


def _status(record: RunRecord) -> str:
    if record.finished:
        return "finished"
    last_round = record.final().get("round")
    if last_round is None:
        return "interrupted: no evaluation yet"
    return f"interrupted: last evaluation at round {last_round}"


def _label(record: RunRecord) -> str:
    """A run's name, flagged when the run did not finish so a comparison is not misread."""
    return record.name if record.finished else f"{record.name} ({_status(record)})"


def _cells(facts: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Formatted values, blank where a run lacks the key (so columns still line up)."""
    return [_format(key, facts[key]) if key in facts else "" for key in keys]


def _what_ran(facts: dict[str, Any]) -> list[Block]:
    items = [*_present(facts, ABOUT_STRATEGY),
             *_flatten(facts.get("strategy_hyperparameters") or {}, "strategy").items(),
             *_present(facts, ABOUT_RUN)]
    blocks = _section("What ran", ("setting", "value"), items)
    if facts.get("strategy_summary"):
        blocks.append(Preformatted(str(facts["strategy_summary"])))
    return blocks


def _asynchronous(record: RunRecord) -> list[Block]:
    """The async server's settings (summary.json) and what came of them over the run
    (rounds.csv): updates lost to clients going offline, dropped as too stale, and the
    buffered updates' mean staleness; nothing for sync and centralized runs."""
    if record.federated_mode != "async":
        return []
    facts, rounds = record.final(), record.rounds
    items = [("mode", "async (FedBuff)"),
             *((label, facts[key]) for label, key in ASYNC_SETTINGS if key in facts)]
    if isinstance(facts.get("staleness"), dict):
        items.append(("staleness function", _staleness_function(facts["staleness"])))
    if "max_staleness" in facts:
        limit = facts["max_staleness"]
        items.append(("max staleness", "none" if limit is None else limit))
    items += [(label, int(rounds[column].sum()))
              for label, column in ASYNC_TOTALS if column in rounds.columns]
    counts = record.staleness_counts()
    if counts:
        mean = sum(s * n for s, n in counts.items()) / sum(counts.values())
        items.append(("mean staleness", f"{mean:.2f} aggregations"))
    return _section("Asynchronous", ("setting", "value"), items)


def _staleness_function(weight: dict[str, Any]) -> str:
    """The staleness weight as its formula with its parameters (staleness.py)."""
    function = weight.get("function")
    if function == "polynomial":
        return f"polynomial: w(s) = (1 + s)^-{weight['exponent']:g}"
    if function == "hinge":
        return (f"hinge: w(s) = 1 up to s = {weight['hinge']}, then "
                f"1 / ({weight['slope']:g} (s - {weight['hinge']}) + 1)")
    return "constant: w(s) = 1"


def _hyperparameters(config: dict[str, Any]) -> list[Block]:
    blocks = [block for name in CONFIG_SECTIONS
              for block in _section(name, ("parameter", "value"),
                                    _flatten(_in_effect(config.get(name) or {})).items(),
                                    level=3)]
    return [Heading("Hyper-parameters"), *blocks] if blocks else []


def _in_effect(section: dict[str, Any]) -> dict[str, Any]:
    """A disabled section's settings do not apply, so listing them would only mislead."""
    return {"enabled": False} if section.get("enabled") is False else section


def _flatten(value: Any, name: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys; a `class_path`/`init_args` pair reads as the class under
    the key itself and its arguments under `key.argument` (e.g. dense_optimizer.lr)."""
    if isinstance(value, dict) and "class_path" in value:
        init_args = value.get("init_args") or {}
        return {name or "class_path": value["class_path"]} | _flatten(init_args, name)
    if isinstance(value, dict):
        return {dotted: leaf for key, item in value.items()
                for dotted, leaf in _flatten(item, f"{name}.{key}" if name else str(key)).items()}
    return {name: value}


def _references(facts: dict[str, Any]) -> list[Block]:
    lines = [_reference_line(label, what, facts[key], facts.get("auc"))
             for key, label, what in REFERENCES if facts.get(key) is not None]
    return [Heading("Reference points"), *map(Paragraph, lines)] if lines else []


def _reference_line(label: str, what: str, reference: float, auc: float | None) -> str:
    line = f"{label} {_format('auc', reference)} ({what})"
    if auc is None:
        return line
    gap = reference - auc
    return f"{line}; this run is {_format('auc', abs(gap))} {'below' if gap >= 0 else 'above'} it"


def _server_learns(facts: dict[str, Any]) -> list[Block]:
    """What crossed from the clients to the server and what differential privacy bounds of it;
    nothing for runs from before summary.json said so."""
    learns = facts.get("server_learns")
    if not learns:
        return []
    rows = [(label, _format(key, learns[key])) for label, key in SERVER_LEARNS if key in learns]
    blocks: list[Block] = [Heading("What the server learns"), Table(("what", "value"), rows)]
    if learns.get("differential_privacy"):
        blocks += _differential_privacy(learns["differential_privacy"])
    if facts.get("stopped_early"):
        blocks.append(Paragraph(f"Stopped early: {facts['stopped_early']}"))
    return blocks


def _differential_privacy(dp: dict[str, Any]) -> list[Block]:
    """The privacy guarantee, led by a warning when the epsilon it states does not hold."""
    rows = [("epsilon", f"{dp['epsilon']:.4g} at delta {dp['delta']:.3g}"),
            ("accountant", _accountant(dp)),
            ("noise multiplier", f"{dp['noise_multiplier']:.4g}"),
            ("clip norm", _clip_norm(dp)),
            ("client sampling", _client_sampling(dp.get("sampling"))),
            ("guarantee holds", _format("guarantee_holds", dp["guarantee_holds"]))]
    blocks: list[Block] = [Heading("Differential privacy", 3)]
    if not dp["guarantee_holds"]:
        reason = dp.get("why_not") or (f"no accountant bounds it (noise multiplier "
                                       f"{dp['noise_multiplier']:.4g})")
        blocks.append(Alert(f"epsilon {dp['epsilon']:.4g} is reported but does not hold: "
                            f"{reason}."))
    return [*blocks, Table(("measure", "value"), rows)]


def _accountant(dp: dict[str, Any]) -> str:
    """The accountant, with the RDP epsilon beside a PLD one for comparison."""
    if dp.get("accountant") is None:
        return "none"
    if dp.get("epsilon_rdp") is None:
        return dp["accountant"]
    return f"{dp['accountant']} (RDP gives epsilon {dp['epsilon_rdp']:.4g})"


def _clip_norm(dp: dict[str, Any]) -> str:
    """The clip norm, and where adaptive clipping took it by the end."""
    if dp.get("adaptive_clipping") and dp.get("last_clip_norm") is not None:
        return (f"{dp['clip_norm']:.4g} at the start, {dp['last_clip_norm']:.4g} at the end "
                "(adaptive)")
    return f"{dp['clip_norm']:.4g} (fixed)"


def _client_sampling(sampling: dict[str, Any] | None) -> str:
    """How clients were sampled, as far as the accountant may assume it."""
    if sampling is None:
        return "none the accountant can assume"
    return f"{sampling['kind'].replace('_', ' ')}, rate {sampling['rate']:.4g}"


def _figures(plots: Sequence[PlotLike]) -> list[Block]:
    images = [Image(plot.title, Path(plot.path)) for plot in plots]
    return [Heading("Plots"), *images] if images else []


def _present(facts: dict[str, Any], keys: Iterable[str]) -> list[tuple[str, Any]]:
    return [(key, facts[key]) for key in keys if key in facts]


def _section(title: str, header: tuple[str, str], items: Iterable[tuple[str, Any]],
             level: int = 2) -> list[Block]:
    """A heading over a key/value table, or nothing when there is nothing to list."""
    rows = [(key, _format(key, value)) for key, value in items]
    return [Heading(title, level), Table(header, rows)] if rows else []


def _format(key: str, value: Any) -> str:
    """A value as a reader wants it, judged by its key's last part: metrics to 4 decimals,
    bytes in MB, seconds to 1 decimal, counts with thousands separators."""
    name = key.rsplit(".", 1)[-1]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is None:
        return "not reached" if name.endswith("_to_target") else "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ", ".join(_format(key, item) for item in value) or "none"
    if number and (name in FOUR_DECIMALS or name.endswith("_auc")):
        return f"{value:.4f}"
    if number and name.startswith("bytes_"):
        return f"{value / 1e6:,.1f} MB"
    if number and (name.endswith("_s") or name == "time_to_target"):
        return f"{value:,.1f} s"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---- renderers --------------------------------------------------------------------------------

def _markdown(document: Document, base: Path) -> str:
    """Markdown whose image links are relative to `base`, the directory the file is written to."""
    parts = [f"# {document.title}", *(_markdown_block(block, base) for block in document.blocks)]
    return "\n\n".join(parts) + "\n"


def _markdown_block(block: Block, base: Path) -> str:
    match block:
        case Heading(text, level):
            return f"{'#' * level} {text}"
        case Paragraph(text):
            return text
        case Alert(text):
            return f"> **Warning:** {text}"
        case Table(header, rows):
            return "\n".join([_markdown_row(header), _markdown_row(("---",) * len(header)),
                              *map(_markdown_row, rows)])
        case Preformatted(text):
            fence = "`" * max([3, *(len(run) + 1 for run in re.findall(r"`+", text))])
            return f"{fence}\n{text.rstrip()}\n{fence}"
        case Image(caption, path):
            link = quote(Path(os.path.relpath(path, base)).as_posix())
            return f"![{caption}]({link})\n*{caption}*"


def _markdown_row(cells: Iterable[str]) -> str:
    escaped = (cell.replace("|", "\\|").replace("\n", " ") for cell in cells)
    return f"| {' | '.join(escaped)} |"


def _html(document: Document) -> str:
    title = html.escape(document.title)
    body = "\n".join(_html_block(block) for block in document.blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{title}</h1>\n{body}\n</body>\n</html>\n")


def _html_block(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{html.escape(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{html.escape(text)}</p>"
        case Alert(text):
            return f'<p class="warning"><strong>Warning:</strong> {html.escape(text)}</p>'
        case Table(header, rows):
            lines = [_html_row(header, "th"), *(_html_row(row, "td") for row in rows)]
            return "<table>\n" + "\n".join(lines) + "\n</table>"
        case Preformatted(text):
            return f"<pre>{html.escape(text.rstrip())}</pre>"
        case Image(caption, path):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_row(cells: Iterable[str], tag: str) -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in cells) + "</tr>"
