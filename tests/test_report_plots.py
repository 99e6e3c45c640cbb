"""Run plots from hand-written run directories: which PNGs exist for which run, and that they are
real images of the intended size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fltoolkit.reports.plots import Plot, write_comparison_plots, write_run_plots
from fltoolkit.reports.record import RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ONE_PANEL = (800, 450)
TWO_PANELS = (800, 550)

FEDERATED_METRICS = """round,wall_time_s,auc,logloss,sim_time_s
2,1.0,0.55,0.30,400.0
4,2.0,0.61,0.27,800.0
6,3.0,0.66,0.25,1200.0
"""
ROUNDS = """round,bytes_up,bytes_down,{duration}
1,2000000,2100000,2.5
2,2200000,2300000,3.5
3,2100000,2200000,1.5
4,2300000,2400000,4.0
"""
# Client 3 has no AUC (only clicks or only non-clicks in its test rows) and client 4 an empty one.
CLIENTS = """client,train_rows,participation,test_rows,test_auc
1,10,2,3,0.7
2,5,0,2,0.4
3,8,1,1,NaN
4,4,0,0,
"""
# Stopped before summary.json, without a simulated clock; the last evaluation has no AUC.
INTERRUPTED_METRICS = """round,wall_time_s,auc,logloss
2,1.0,0.55,0.30
4,2.0,0.61,0.27
6,3.0,,0.25
"""
# DP on: epsilon after each evaluated round; "inf" throughout when the noise multiplier is 0.
PRIVATE_METRICS = """round,wall_time_s,auc,logloss,epsilon
10,1.0,0.55,0.30,{}
20,2.0,0.58,0.28,{}
30,3.0,0.60,0.27,{}
"""
# Async: three aggregations of three buffered updates; the last one dropped an update as stale.
ASYNC_ROUNDS = """\
round,round_duration_s,dropped,mean_staleness,max_staleness,dropped_stale,staleness_counts
1,2.5,1,0,0,0,0:3
2,3.5,0,0.6667,1,0,0:1;1:2
3,1.5,0,1.3333,4,1,0:2;4:1
"""
CENTRAL_METRICS = """round,wall_time_s,auc,logloss
1,5.0,0.70,0.20
2,10.0,0.74,0.19
"""


def _run_dir(path: Path, metrics: str, summary: dict | None = None, rounds: str | None = None,
             clients: str | None = None) -> RunRecord:
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text(metrics)
    for name, text in (("rounds.csv", rounds), ("clients.csv", clients)):
        if text is not None:
            (path / name).write_text(text)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return RunRecord.load(path)


def _federated(path: Path) -> RunRecord:
    return _run_dir(path, FEDERATED_METRICS,
                    {"mode": "federated", "auc": 0.66, "oracle_auc": 0.8, "baseline_auc": 0.6,
                     "centralized_auc": 0.74},
                    ROUNDS.format(duration="round_duration_s"), CLIENTS)


def _async(path: Path) -> RunRecord:
    return _run_dir(path, FEDERATED_METRICS, {"mode": "federated", "federated_mode": "async",
                                              "auc": 0.66}, ASYNC_ROUNDS)


def _central(path: Path) -> RunRecord:
    return _run_dir(path, CENTRAL_METRICS, {"mode": "centralized", "auc": 0.74,
                                            "oracle_auc": 0.8})


def _private(path: Path, *epsilons: str) -> RunRecord:
    return _run_dir(path, PRIVATE_METRICS.format(*epsilons),
                    {"mode": "federated", "auc": 0.6, "evaluated_on": "validation"})


def _assert_png(path: Path, size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    assert struct.unpack(">II", data[16:24]) == size  # IHDR width, height


def _names(plots: list[Plot]) -> list[str]:
    return [plot.path.name for plot in plots]


def test_federated_run_with_sim_time_gets_all_six_plots(tmp_path):
    out = tmp_path / "report" / "plots"  # created, parents included
    plots = write_run_plots(_federated(tmp_path / "runs" / "fed"), out)
    assert _names(plots) == ["quality_vs_round.png", "quality_vs_time.png", "client_auc.png",
                             "participation.png", "bytes_per_round.png", "round_duration.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(_names(plots))
    for plot in plots:
        assert plot.title and plot.path.parent == out
        _assert_png(plot.path, TWO_PANELS if plot.path.name.startswith("quality") else ONE_PANEL)
    titles = {plot.path.name: plot.title for plot in plots}
    assert "2 of 4 clients have an AUC" in titles["client_auc.png"]
    assert "2 of 4 clients never took part" in titles["participation.png"]
    assert "simulated" in titles["round_duration.png"]


def test_centralized_run_gets_only_quality_vs_round(tmp_path):
    out = tmp_path / "plots"
    plots = write_run_plots(_central(tmp_path / "runs" / "central"), out)
    assert _names(plots) == ["quality_vs_round.png"]
    assert plots[0].title == "AUC and logloss vs epoch"
    assert [p.name for p in out.iterdir()] == ["quality_vs_round.png"]
    _assert_png(plots[0].path, TWO_PANELS)


def test_interrupted_run_without_summary_plots_what_exists(tmp_path):
    record = _run_dir(tmp_path / "runs" / "cut", INTERRUPTED_METRICS,
                      rounds=ROUNDS.format(duration="round_wall_s"), clients=CLIENTS)
    assert not record.finished
    plots = write_run_plots(record, tmp_path / "plots")
    assert _names(plots) == ["quality_vs_round.png", "client_auc.png", "participation.png",
                             "bytes_per_round.png", "round_duration.png"]
    assert "wall-clock" in plots[-1].title
    for plot in plots:
        _assert_png(plot.path, TWO_PANELS if plot.path.name.startswith("quality") else ONE_PANEL)


def test_comparison_overlays_runs_and_adds_time_when_one_run_has_it(tmp_path):
    fed, central = _federated(tmp_path / "runs" / "fed"), _central(tmp_path / "runs" / "central")
    plots = write_comparison_plots([fed, central], tmp_path / "both")
    assert _names(plots) == ["compare_auc_vs_round.png", "compare_logloss_vs_round.png",
                             "compare_auc_vs_time.png"]
    for plot in plots:
        _assert_png(plot.path, ONE_PANEL)
    without_time = write_comparison_plots([central, central], tmp_path / "central_only")
    assert _names(without_time) == ["compare_auc_vs_round.png", "compare_logloss_vs_round.png"]


def test_a_private_run_plots_auc_against_a_finite_epsilon(tmp_path):
    plots = write_run_plots(_private(tmp_path / "runs" / "dp", "2.9", "3.6", "4.1"),
                            tmp_path / "plots")
    assert _names(plots) == ["quality_vs_round.png", "auc_vs_epsilon.png"]
    assert plots[1].title == "AUC vs epsilon"
    _assert_png(plots[1].path, ONE_PANEL)
    unbounded = _private(tmp_path / "runs" / "no_noise", "inf", "inf", "inf")
    assert _names(write_run_plots(unbounded, tmp_path / "no_noise")) == ["quality_vs_round.png"]


def test_comparison_plots_auc_against_epsilon_when_a_run_has_one(tmp_path):
    fed = _federated(tmp_path / "runs" / "fed")
    private = _private(tmp_path / "runs" / "dp", "2.9", "3.6", "4.1")
    plots = write_comparison_plots([fed, private], tmp_path / "both")
    assert _names(plots)[-1] == "compare_auc_vs_epsilon.png"
    _assert_png(plots[-1].path, ONE_PANEL)


def test_an_async_run_gets_a_histogram_of_every_buffered_updates_staleness(tmp_path):
    record = _async(tmp_path / "runs" / "async")
    assert record.staleness_counts() == {0: 6, 1: 2, 4: 1}
    plots = write_run_plots(record, tmp_path / "plots")
    assert _names(plots)[-1] == "staleness.png"
    assert plots[-1].title == ("Update staleness (9 buffered updates, mean 0.67 aggregations; "
                               "1 dropped as too stale)")
    _assert_png(plots[-1].path, ONE_PANEL)


def test_a_sync_run_and_an_async_one_from_before_staleness_counts_get_no_histogram(tmp_path):
    sync = write_run_plots(_federated(tmp_path / "runs" / "sync"), tmp_path / "sync")
    without_counts = "\n".join(line.rsplit(",", 1)[0] for line in ASYNC_ROUNDS.splitlines())
    older = _run_dir(tmp_path / "runs" / "older", FEDERATED_METRICS, rounds=without_counts)
    assert older.federated_mode == "async" and older.staleness_counts() == {}
    for plots in (sync, write_run_plots(older, tmp_path / "older")):
        assert "staleness.png" not in _names(plots)


def test_comparing_a_sync_and_an_async_run_overlays_them_against_simulated_time(tmp_path):
    runs = [_federated(tmp_path / "runs" / "sync"), _async(tmp_path / "runs" / "async")]
    assert [run.federated_mode for run in runs] == ["sync", "async"]
    plots = write_comparison_plots(runs, tmp_path / "both")
    assert _names(plots) == ["compare_auc_vs_round.png", "compare_logloss_vs_round.png",
                             "compare_auc_vs_time.png"]


def test_a_budgeted_run_plots_its_rows_and_the_ids_moved_and_whole_tables_do_not(tmp_path):
    budgeted = """round,bytes_up,bytes_down,table_rows,rows_evicted,rows_admitted
1,10,10,100,0,60
2,10,10,100,0,0
3,10,10,100,5,5
"""
    record = _run_dir(tmp_path / "runs" / "budget", FEDERATED_METRICS, rounds=budgeted)
    plots = write_run_plots(record, tmp_path / "plots")
    assert _names(plots)[-1] == "embedding_rows.png"
    assert plots[-1].title == "Embedding rows under the budget"
    _assert_png(plots[-1].path, ONE_PANEL)
    whole = write_run_plots(_federated(tmp_path / "runs" / "whole"), tmp_path / "whole")
    assert "embedding_rows.png" not in _names(whole)
