"""Run directories end to end: every file after a 2-round run, a self-contained report.html,
`fltk report` on a finished and an interrupted run, and a comparison of two runs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fltoolkit.reports.screenshot import find_chromium, screenshot
from fltoolkit.reports.tensorboard import TensorBoardLog
from fltoolkit.run.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = str(REPO / "experiments" / "taobao.yaml")
PLOTS = {"quality_vs_round.png", "quality_vs_time.png", "client_auc.png", "participation.png",
         "bytes_per_round.png", "round_duration.png"}


def _two_rounds(tmp_path: Path, name: str, *extra: str) -> Path:
    run = tmp_path / name
    assert main(["fit", "--experiment", EXPERIMENT, "--data.num_rows", "10000",
                 "--data.init_args.cache_dir", str(tmp_path / "cache"), "--run_dir", str(run),
                 "--federated.rounds", "2", "--federated.eval_interval", "1",
                 "--systems.enabled", "true", "--report.centralized_auc", "0.8",
                 *extra]) == 0
    return run


def _external_references(html: str) -> list[str]:
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    return ([s for s in sources if not s.startswith(("data:", "#"))]
            + re.findall(r"<link\b|https?://|url\((?!data:)", html))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("reports")
    return (_two_rounds(tmp_path, "fedavg"),
            _two_rounds(tmp_path, "oort", "--federated.selector.class_path",
                        "fltoolkit.selection.Oort"))


def test_a_two_round_run_leaves_every_file(runs):
    run = runs[0]
    for name in ("config.yaml", "metrics.csv", "rounds.csv", "clients.csv", "summary.json",
                 "report.md", "report.html", "checkpoints/final.pt"):
        assert (run / name).is_file(), name
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # what `tensorboard --logdir` reads
    assert [e.step for e in events.Scalars("eval/auc")] == [1, 2]
    assert {"eval_vs_sim_time/auc", "round/bytes_up", "round/rows_up",
            "round/failed"} <= set(events.Tags()["scalars"])
    assert "eval/epsilon" not in events.Tags()["scalars"]  # no DP, no epsilon
    assert {p.name for p in (run / "plots").glob("*.png")} == PLOTS
    clients = pl.read_csv(run / "clients.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert clients.height == summary["num_clients"]
    assert clients["participation"].sum() == 2 * summary["clients_per_round"]
    assert summary["centralized_auc"] == 0.8 and summary["model_parameters"] > 0
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state.values())


def test_report_html_is_self_contained_and_names_the_final_auc(runs):
    run = runs[0]
    html = (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert _external_references(html) == []
    assert f"{summary['auc']:.4f}" in html
    assert html.count("data:image/png;base64,") == len(PLOTS)
    assert "<h2>What the server learns</h2>" in html and "each client&#x27;s update" in html
    assert "plots/quality_vs_round.png" in (run / "report.md").read_text()


def test_fltk_report_regenerates_and_reports_an_interrupted_run(runs, tmp_path):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    for name in ("config.yaml", "metrics.csv", "rounds.csv"):  # killed before the summary
        (interrupted / name).write_bytes((runs[0] / name).read_bytes())
    assert main(["report", str(interrupted)]) == 0
    text = (interrupted / "report.md").read_text()
    assert "interrupted" in text and (interrupted / "plots" / "quality_vs_round.png").is_file()
    last_auc = pl.read_csv(interrupted / "metrics.csv")["auc"][-1]
    assert f"{last_auc:.4f}" in text


def test_comparing_two_runs_gives_one_table_with_both(runs, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    html = (out / "comparison.html").read_text()
    assert _external_references(html) == []
    tables = re.findall(r"<table.*?</table>", html, flags=re.S)
    both = [t for t in tables if "fedavg" in t and "oort" in t]
    assert len(both) == 1
    for run in runs:
        assert f"{json.loads((run / 'summary.json').read_text())['auc']:.4f}" in both[0]
    assert main(["report", *map(str, runs)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_tensorboard_gets_a_finite_epsilon_and_the_rounds_failed_and_rows_received(tmp_path):
    log = TensorBoardLog(tmp_path / "tensorboard")
    for round_index, epsilon in ((10, 2.9), (20, 3.6), (30, math.inf)):
        log.evaluation({"round": round_index, "auc": 0.6, "epsilon": epsilon})
    log.round({"round": 1, "failed": 1, "rows_up": 1713})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    epsilons = events.Scalars("eval/epsilon")
    assert [(e.step, round(e.value, 3)) for e in epsilons] == [(10, 2.9), (20, 3.6)]  # no inf
    assert [e.value for e in events.Scalars("round/failed")] == [1]
    assert [e.value for e in events.Scalars("round/rows_up")] == [1713]


def test_tensorboard_gets_the_staleness_of_async_rounds_and_skips_it_in_sync_ones(tmp_path):
    log = TensorBoardLog(tmp_path / "tensorboard")
    log.round({"round": 1, "aggregated": 10})  # sync: no staleness
    log.round({"round": 2, "aggregated": 10, "mean_staleness": 1.5, "max_staleness": 4,
               "dropped_stale": 2, "staleness_counts": "0:4;1:3;2:1;4:2"})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag, value in (("mean_staleness", 1.5), ("max_staleness", 4), ("dropped_stale", 2)):
        assert [(e.step, e.value) for e in events.Scalars(f"round/{tag}")] == [(2, value)]
    assert "round/staleness_counts" not in events.Tags()["scalars"]


def test_report_command_on_an_async_run_imports_no_torch(tmp_path):
    run = tmp_path / "async"
    run.mkdir()
    (run / "metrics.csv").write_text("round,wall_time_s,auc,logloss,sim_time_s\n"
                                     "1,1.0,0.6,0.3,2.5\n2,2.0,0.62,0.29,6.0\n")
    (run / "rounds.csv").write_text("round,mean_staleness,max_staleness,staleness_counts\n"
                                    "1,0,0,0:2\n2,0.5,1,0:1;1:1\n")
    script = ("import sys; from fltoolkit.run.cli import main; "
              f"code = main(['report', {str(run)!r}]); "
              "print(code, 'torch' in sys.modules, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True)
    assert done.stdout.splitlines()[-1] == "0 False False"
    assert (run / "plots" / "staleness.png").exists()


@pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    shot = screenshot(runs[0] / "report.html", tmp_path / "shot.png", height=3000)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1100)
    # a rendered page, not a blank one: text and plots leave many non-white rows
    assert (pixels.min(axis=1) < 128).mean() > 0.3
