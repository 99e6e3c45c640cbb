"""Benchmark scripts, run end to end at a tiny size (benchmarks/ is a folder of scripts, not a
package: they import their shared helpers by file name)."""

from __future__ import annotations

import json
import math
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_full_pass_trains_every_client_once_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import full_pass

    figures = full_pass.main(["--rows", "20000", "--clients-per-round", "200",
                              "--sequential-clients", "400", "--dir", str(tmp_path)])

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"benchmark": "full_pass", **figures}
    assert figures["clients_trained_once"] == figures["train_clients"] > 200
    assert figures["rounds"] == math.ceil(figures["train_clients"] / 200)
    assert figures["sequential_clients"] == 400
    for key in ("generate_s", "preprocess_s", "preprocess_peak_rss_mb", "train_s",
                "updates_per_s", "samples_per_s", "auc", "baseline_auc",
                "sequential_updates_per_s", "sequential_samples_per_s",
                "vectorized_over_sequential", "peak_rss_mb"):
        assert figures[key] is not None, key
    assert not any(tmp_path.iterdir())  # the generated data is removed


def test_privacy_utility_runs_each_budget_and_reports(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import privacy_utility

    figures = privacy_utility.main(["--rows", "5000", "--rounds", "4", "--epsilons", "10"])

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"benchmark": "privacy_utility", **figures}
    runs = figures["runs"]
    assert list(runs) == ["no_dp", "clipping_only", "clipping_only_own_settings", "epsilon_10"]
    assert runs["no_dp"]["epsilon"] is None and math.isinf(runs["clipping_only"]["epsilon"])
    assert 0 < runs["epsilon_10"]["epsilon"] <= 10 and runs["epsilon_10"]["noise_multiplier"] > 0


def test_async_vs_sync_reports_both_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import async_vs_sync

    figures = async_vs_sync.main(["--rounds", "20", "--targets", "0.5", "--dir",
                                  str(tmp_path)])

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"benchmark": "async_vs_sync", **figures}
    for mode in ("sync", "async"):
        assert figures[f"{mode}_sim_time_s"] > 0 and 0.5 < figures[f"{mode}_final_test_auc"]
        assert figures["time_to_0.5"][mode] is not None
    assert figures["async_over_sync_time_to_0.5"] > 0


def test_embedding_budget_runs_every_method_and_reports_sizes(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import embedding_budget

    figures = embedding_budget.main(["--rounds", "2", "--datasets", "taobao", "--budgets",
                                     "0.5"])

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"benchmark": "embedding_budget", **figures}
    runs = figures["runs"]
    assert list(runs) == ["taobao_full", "taobao_adaembed_0.5", "taobao_adaembed_counts_0.5",
                          "taobao_frequency_0.5", "taobao_hashing_0.5"]
    full = runs["taobao_full"]["embedding_rows"]
    assert full == runs["taobao_full"]["embedding_rows_logical"]
    for name in list(runs)[1:]:  # about half the rows, + 1 fallback per budgeted table
        assert 0.45 * full < runs[name]["embedding_rows"] < 0.55 * full, name
