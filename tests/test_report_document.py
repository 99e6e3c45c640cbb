"""Run reports and comparisons: both formats say the same, and the HTML stands alone."""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fltoolkit.reports.document import write_comparison, write_run_report
from fltoolkit.reports.record import RunRecord

METRICS_CSV = """round,wall_time_s,auc,logloss,ne,gauc,calibration,sim_time_s
25,5.0,0.61234,0.19,1.0,0.55,1.4,57.5
50,10.0,0.65432,0.18,0.95,0.60,1.2,105.4
"""
CONFIG = {
    "model": {"class_path": "recsys.module.CTRModule",
              "init_args": {"embedding_dim": 16,
                            "dense_optimizer": {"class_path": "torch.optim.SGD",
                                                "init_args": {"lr": 0.3}}}},
    "federated": {"enabled": True, "rounds": 50, "clients_per_round": 4},
    "systems": {"enabled": False, "over_commit": 1.3},
    "data": {"class_path": "datamodules.synthetic.SyntheticDataModule",
             "init_args": {"num_rows": 200000}},
}
SUMMARY = {"mode": "federated", "strategy": "FedAvg", "selector": "Oort", "rounds": 50,
           "strategy_hyperparameters": {"server_lr": 1.0},
           "strategy_summary": "FedAvg\n  server_lr: 1.0", "model_parameters": 1234567,
           "auc": 0.7365, "logloss": 0.18, "ne": 0.95, "gauc": 0.6, "calibration": 1.2,
           "bytes_up_total": 1396103880, "sim_time_s": 105.44, "rounds_to_target": None,
           "oracle_auc": 0.8258, "baseline_auc": 0.6164, "num_train": 174793}
ASYNC_SUMMARY = {**SUMMARY, "federated_mode": "async", "concurrency": 20, "buffer_size": 10,
                 "staleness": {"function": "hinge", "exponent": 0.5, "slope": 2.0, "hinge": 1},
                 "max_staleness": 3}
# Two aggregations: one client went offline, one update was dropped as staler than 3.
ASYNC_ROUNDS = """round,dropped,mean_staleness,max_staleness,dropped_stale,staleness_counts
1,1,0,0,0,0:2
2,0,1.5,3,1,0:1;3:1
"""
SERVER_LEARNS = {
    "server_receives": "only the sum of the cohort's clipped, quantized updates",
    "row_ids": "the union of the cohort's touched rows per table",
    "per_client_in_clear": ["sample count", "training loss"],
    "tables_uploaded": ["item", "category"], "tables_local": ["user"],
    "local_tables_stay_local": True,
    "rows_received_per_round": 1713, "bytes_received_per_round": 2339388,
}
DP = {"epsilon": 1.4612, "delta": 0.000115, "noise_multiplier": 0.5, "clip_norm": 1.0,
      "last_clip_norm": 0.8123, "adaptive_clipping": True, "accountant": "pld",
      "epsilon_rdp": 3.0911, "sampling": {"kind": "poisson", "rate": 0.0023},
      "guarantee_holds": True}
UNACCOUNTED = {**DP, "adaptive_clipping": False, "accountant": "rdp", "epsilon_rdp": None,
               "sampling": None, "guarantee_holds": False,
               "why_not": "Oort does not sample clients at random"}


@dataclass
class Plot:
    title: str
    path: Path


def png_bytes() -> bytes:
    """A valid 1x1 grey PNG, built by hand so the test needs no plotting library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def make_run(root: Path, name: str, summary: dict | None) -> tuple[RunRecord, Plot]:
    run = root / "exp" / name
    (run / "plots").mkdir(parents=True)
    (run / "metrics.csv").write_text(METRICS_CSV)
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    plot = Plot("AUC <vs> round", run / "plots" / "quality_vs_round.png")
    plot.path.write_bytes(png_bytes())
    return RunRecord.load(run), plot


@pytest.fixture
def finished(tmp_path: Path) -> tuple[RunRecord, Plot]:
    return make_run(tmp_path, "finished", SUMMARY)


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)


def test_run_report_html_is_self_contained_and_embeds_the_plot(finished):
    record, plot = finished
    markdown, page = write_run_report(record, [plot])
    assert (markdown, page) == (record.path / "report.md", record.path / "report.html")
    text = page.read_text()
    assert_self_contained(text)
    assert base64.b64encode(png_bytes()).decode() in text
    assert "<figcaption>AUC &lt;vs&gt; round</figcaption>" in text
    assert "<td>auc</td><td>0.7365</td>" in text
    assert "<title>exp/finished (finished)</title>" in text


def test_run_report_markdown_links_the_plot_and_lists_what_ran(finished):
    record, plot = finished
    text = write_run_report(record, [plot])[0].read_text()
    assert text.startswith("# exp/finished (finished)\n")
    assert "![AUC <vs> round](plots/quality_vs_round.png)" in text
    assert "| auc | 0.7365 |" in text
    for row in ("| strategy.server_lr | 1.0 |", "| model_parameters | 1,234,567 |",
                "| num_train | 174,793 |", "| bytes_up_total | 1,396.1 MB |",
                "| sim_time_s | 105.4 s |", "| rounds_to_target | not reached |",
                "| dense_optimizer | torch.optim.SGD |", "| dense_optimizer.lr | 0.3 |",
                "| num_rows | 200,000 |"):
        assert row in text
    assert "```\nFedAvg\n  server_lr: 1.0\n```" in text
    assert "oracle AUC 0.8258 (planted model); this run is 0.0893 below it" in text
    assert "popularity baseline AUC 0.6164" in text
    assert "over_commit" not in text  # systems is disabled: only that is said
    assert "What the server learns" not in text  # a run from before summary.json said it


def test_run_report_says_what_the_server_learns_and_the_epsilon_that_holds(tmp_path):
    summary = SUMMARY | {"server_learns": SERVER_LEARNS | {"differential_privacy": DP}}
    record, plot = make_run(tmp_path, "private", summary)
    text = write_run_report(record, [plot])[0].read_text()
    for row in ("| receives | only the sum of the cohort's clipped, quantized updates |",
                "| in the clear per client | sample count, training loss |",
                "| tables uploaded | item, category |", "| tables kept local | user |",
                "| local tables stay local | true |", "| rows received per round | 1,713 |",
                "| bytes received per round | 2.3 MB |",
                "| epsilon | 1.461 at delta 0.000115 |",
                "| accountant | pld (RDP gives epsilon 3.091) |", "| noise multiplier | 0.5 |",
                "| clip norm | 1 at the start, 0.8123 at the end (adaptive) |",
                "| client sampling | poisson, rate 0.0023 |", "| guarantee holds | true |"):
        assert row in text
    assert "Warning" not in text and "Stopped early" not in text


def test_an_epsilon_that_does_not_hold_is_a_warning_in_both_formats(tmp_path):
    summary = SUMMARY | {"server_learns": SERVER_LEARNS | {"differential_privacy": UNACCOUNTED},
                         "stopped_early": "privacy budget: stopped after round 7"}
    record, plot = make_run(tmp_path, "unaccounted", summary)
    markdown, page = write_run_report(record, [plot])
    warning = ("epsilon 1.461 is reported but does not hold: Oort does not sample clients at "
               "random.")
    assert f"> **Warning:** {warning}" in markdown.read_text()
    assert f'<p class="warning"><strong>Warning:</strong> {warning}</p>' in page.read_text()
    for row in ("| accountant | rdp |", "| clip norm | 1 (fixed) |",
                "| client sampling | none the accountant can assume |",
                "| guarantee holds | false |",
                "Stopped early: privacy budget: stopped after round 7"):
        assert row in markdown.read_text()


def test_clipping_without_noise_warns_that_nothing_bounds_epsilon(tmp_path):
    no_noise = {**DP, "epsilon": float("inf"), "noise_multiplier": 0.0, "accountant": None,
                "epsilon_rdp": None, "sampling": None, "guarantee_holds": False}
    summary = SUMMARY | {"server_learns": SERVER_LEARNS | {"differential_privacy": no_noise}}
    record, plot = make_run(tmp_path, "clip", summary)
    text = write_run_report(record, [plot])[0].read_text()
    assert ("> **Warning:** epsilon inf is reported but does not hold: no accountant bounds it "
            "(noise multiplier 0).") in text
    assert "| accountant | none |" in text


def test_interrupted_run_reports_the_last_evaluation(tmp_path):
    record, plot = make_run(tmp_path, "cut", summary=None)
    markdown, page = write_run_report(record, [plot])
    for text in (markdown.read_text(), page.read_text()):
        assert "interrupted: last evaluation at round 50" in text
        assert "0.6543" in text
    assert "## What ran" not in markdown.read_text()  # no summary: nothing claimed about it
    assert "| enabled | true |" in markdown.read_text()  # but the config is still shown


def test_comparison_is_one_table_with_every_run(tmp_path):
    first, plot = make_run(tmp_path, "first", SUMMARY)
    second, _ = make_run(tmp_path, "second", summary=None)
    out = tmp_path / "compare"
    markdown, page = write_comparison([first, second], [plot], out)
    assert (markdown, page) == (out / "comparison.md", out / "comparison.html")
    html_text = page.read_text()
    assert_self_contained(html_text)
    assert html_text.count("<table>") == 1
    table = [line for line in markdown.read_text().splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, separator, one row per run
    assert "exp/first" in table[2] and "0.7365" in table[2]
    assert "exp/second (interrupted" in table[3] and "0.6543" in table[3]
    assert "](../exp/first/plots/quality_vs_round.png)" in markdown.read_text()


def test_an_async_run_report_lists_its_settings_and_what_staleness_cost(tmp_path):
    record, plot = make_run(tmp_path, "async", ASYNC_SUMMARY)
    (record.path / "rounds.csv").write_text(ASYNC_ROUNDS)
    markdown, page = write_run_report(RunRecord.load(record.path), [plot])
    text = markdown.read_text()
    table = text.split("## Asynchronous\n\n", 1)[1].split("\n\n", 1)[0]
    assert table.splitlines()[2:] == [
        "| mode | async (FedBuff) |", "| concurrency | 20 |", "| buffer size | 10 |",
        "| staleness function | hinge: w(s) = 1 up to s = 1, then 1 / (2 (s - 1) + 1) |",
        "| max staleness | 3 |", "| updates lost (client offline) | 1 |",
        "| dropped as stale | 1 |", "| mean staleness | 0.75 aggregations |"]
    assert "| federated_mode | async |" in text
    assert "<h2>Asynchronous</h2>" in page.read_text()


def test_sync_and_centralized_reports_have_no_asynchronous_section(tmp_path):
    for name, summary in (("sync", {**SUMMARY, "federated_mode": "sync"}),
                          ("central", {**SUMMARY, "mode": "centralized"})):
        record, plot = make_run(tmp_path, name, summary)
        markdown, _ = write_run_report(record, [plot])
        assert "Asynchronous" not in markdown.read_text()


def test_comparing_a_sync_and_an_async_run_says_each_ones_mode(tmp_path):
    sync, plot = make_run(tmp_path, "sync", {**SUMMARY, "federated_mode": "sync"})
    asynchronous, _ = make_run(tmp_path, "async", ASYNC_SUMMARY)
    central, _ = make_run(tmp_path, "central", {**SUMMARY, "mode": "centralized"})
    markdown, _ = write_comparison([sync, asynchronous, central], [plot], tmp_path / "compare")
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| exp/")]
    assert [row.split(" | ")[1] for row in rows] == [
        "federated (sync)", "federated (async)", "centralized"]
