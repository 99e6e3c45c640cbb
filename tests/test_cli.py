"""`fltk fit` end to end (in-process: a subprocess would pay ~10 s of imports) and its errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from fltoolkit.run.cli import main

BUILT_IN = Path(__file__).resolve().parents[1] / "experiments"
EXPERIMENT = str(BUILT_IN / "taobao.yaml")


def _fit(tmp_path: Path, *extra: str) -> int:
    return main(["fit", "--experiment", EXPERIMENT, "--data.num_rows", "10000",
                 "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 *extra])


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_centralized_fit_writes_config_metrics_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(tmp_path, "--run_dir", str(run), "--federated.enabled", "false",
                "--trainer.max_epochs", "3") == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["init_args"]["num_rows"] == 10000 and config["seed"] == 0
    rows = _csv_rows(run / "metrics.csv")
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0])[:7] == ["round", "wall_time_s", "auc", "logloss", "ne", "gauc",
                                 "calibration"]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("auc", "logloss", "ne", "gauc", "calibration", "num_train", "num_test",
                "num_clients", "wall_time_s", "baseline_auc", "oracle_auc"):
        assert summary[key] is not None, key
    # summary.json counts no validation rows (yet): the prepared splits' sizes do
    prepared = next((tmp_path / "cache" / "prepared").glob("taobao-*/meta.json"))
    validation_rows = json.loads(prepared.read_text())["rows_validation"]
    assert summary["num_train"] + validation_rows + summary["num_test"] == 10000
    assert 0.6 < summary["auc"] <= 1.0
    # metrics.csv holds validation metrics; the test split is reported once, in summary.json
    assert summary["evaluated_on"] == "validation"
    assert float(rows[-1]["auc"]) == pytest.approx(summary["validation"]["auc"], abs=1e-9)
    best = max(rows, key=lambda row: float(row["auc"]))
    assert summary["best_round"] == int(best["round"])
    assert summary["best_validation_auc"] == pytest.approx(float(best["auc"]), abs=1e-9)
    assert 0.6 < summary["best_round_test"]["auc"] <= 1.0
    # a finished run directory is never reused
    assert _fit(tmp_path, "--run_dir", str(run), "--federated.enabled", "false") == 2
    assert "already exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--data.num_rowz", "5"], "unknown key data.num_rowz"),
    (["--federated.enabld", "true"], "unknown key federated.enabld"),
    (["--model.embedding_dim", "abc"], "model.embedding_dim: expected int, got abc"),
    (["--data.min_count", "0"], "data.min_count, data.test_days and data.num_rows must be >= 1"),
    (["--data.data_dir", "/nonexistent/taobao"], "/nonexistent/taobao: no such directory"),
    (["--federated.rounds", "-3"], "federated.rounds must be >= 1, got -3"),
    (["--federated.clients_per_round", "100000"],
     "federated.clients_per_round=100000 exceeds the"),
    (["--federated.faults.nan", "1.5"], "federated.faults.nan must be in [0, 1], got 1.5"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: not a run directory"),
    (["--federated.sharding", "table_wise"], "federated.sharding=table_wise splits the tables "
     "across ranks: launch with torchrun"),
    (["--federated.strategy.class_path", "fltoolkit.strategies.FedAdam",
      "--federated.strategy.init_args.sparse_weighting", "tuoched"],
     "federated.strategy.sparse_weighting: 'tuoched' is not one of 'touched', 'global'"),
    (["--federated.sharding", "rows"],
     "federated.sharding: 'rows' is not one of 'none', 'table_wise', 'column_wise'"),
    (["--federated.strategy.init_args.sparse_weighting", "tuoched"],
     "federated.strategy.sparse_weighting: 'tuoched' is not one of 'touched', 'global'"),
    (["--federated.strategy.class_path", "fltoolkit.strategies.FedOpt"],
     "federated.strategy.class_path: expected an instantiatable class, but "
     "fltoolkit.strategies.FedOpt is abstract"),
])
def test_bad_config_fails_in_one_line_naming_the_key(tmp_path, capsys, args, message):
    assert _fit(tmp_path, "--run_dir", str(tmp_path / "run"), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_typo_inside_the_experiment_yaml_is_named(tmp_path, capsys):
    experiment = tmp_path / "typo.yaml"
    experiment.write_text(Path(EXPERIMENT).read_text().replace("eval_interval:", "eval_intervall:"))
    assert main(["fit", "--experiment", str(experiment)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key federated.eval_intervall" in err[0]


@pytest.mark.parametrize(("name", "data_class"), [
    ("taobao", "datamodules.taobao.TaobaoDataModule"),
    ("taobao.yaml", "datamodules.taobao.TaobaoDataModule"),
    ("criteo", "datamodules.criteo.CriteoDataModule"),
])
def test_a_built_in_experiment_is_found_by_name_from_any_folder(tmp_path, monkeypatch, name,
                                                                data_class):
    from fltoolkit.run.parser import FltkCLI, experiment_name

    monkeypatch.chdir(tmp_path)
    cli = FltkCLI(["--experiment", name])
    assert cli.config.data.class_path == data_class
    assert experiment_name(cli.config) == name.removesuffix(".yaml")  # runs/<name>/


def test_a_file_of_that_name_in_the_folder_wins_over_the_built_in(tmp_path, monkeypatch):
    from fltoolkit.run.parser import FltkCLI

    monkeypatch.chdir(tmp_path)
    Path("taobao.yaml").write_text(Path(EXPERIMENT).read_text().replace("num_rows: 200000",
                                                                        "num_rows: 5000"))
    assert FltkCLI(["--experiment", "taobao.yaml"]).config.data.init_args.num_rows == 5000


def test_python_entry_point_finds_a_built_in_experiment_by_name(tmp_path, monkeypatch):
    import fltoolkit
    from fltoolkit.run.config import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="federated.rounds must be >= 1"):  # parsed: found
        fltoolkit.fit("taobao", federated={"rounds": 0})


def test_an_unknown_experiment_fails_in_one_line_listing_the_built_in_ones(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--experiment", "taobo"]) == 2
    names = ", ".join(sorted(path.stem for path in BUILT_IN.glob("*.yaml")))
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fltk fit: error: experiment: no file or built-in experiment named 'taobo'; "
        f"built-in: {names}"]


def test_fit_help_names_the_built_in_experiments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert ", ".join(sorted(path.stem for path in BUILT_IN.glob("*.yaml"))) in help_text


def test_experiments_command_lists_names_and_first_comment_lines(capsys):
    assert main(["experiments"]) == 0
    listed = capsys.readouterr().out.splitlines()
    for path in BUILT_IN.glob("*.yaml"):
        first_comment = next(line for line in path.read_text().splitlines()
                             if line.startswith("#"))
        assert any(line.split() == [path.stem, *first_comment.split()[1:]] for line in listed)


def test_missing_data_file_fails_before_training(tmp_path, capsys):
    (tmp_path / "taobao").mkdir()
    assert _fit(tmp_path, "--data.data_dir", str(tmp_path / "taobao")) == 2
    assert "raw_sample.csv: file not found" in capsys.readouterr().err


def test_unknown_command_and_help(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err
    assert main(["help"]) == 0


@pytest.mark.slow
def test_federated_fit_selects_the_strategy_by_class_path(tmp_path):
    run = tmp_path / "run"
    assert _fit(tmp_path, "--run_dir", str(run), "--federated.enabled", "true",
                "--federated.rounds", "4", "--federated.clients_per_round", "20",
                "--federated.eval_interval", "2", "--federated.local_tables", "[user]",
                "--federated.strategy.class_path", "fltoolkit.strategies.FedYogi",
                "--federated.strategy.init_args.server_lr", "0.02") == 0
    rows = _csv_rows(run / "metrics.csv")
    assert [r["round"] for r in rows] == ["2", "4"]
    assert int(rows[-1]["clients_seen"]) > 20 and int(rows[-1]["bytes_up_per_round"]) > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["strategy"] == "FedYogi"
    assert summary["strategy_hyperparameters"]["server_lr"] == 0.02
    assert summary["local_tables"] == ["user"]
    assert summary["bytes_up_per_round"] > 0 and summary["bytes_down_per_round"] > 0


@pytest.mark.slow
def test_systems_add_a_simulated_clock_to_metrics_and_summary(tmp_path):
    run = tmp_path / "run"
    assert _fit(tmp_path, "--run_dir", str(run), "--federated.rounds", "4",
                "--federated.clients_per_round", "10", "--federated.eval_interval", "2",
                "--systems.enabled", "true", "--systems.over_commit", "1.5",
                "--federated.selector.class_path", "fltoolkit.selection.Oort",
                "--report.target_auc", "0.01") == 0
    rows = _csv_rows(run / "metrics.csv")
    assert 0 < float(rows[0]["sim_time_s"]) < float(rows[1]["sim_time_s"])
    rounds = _csv_rows(run / "rounds.csv")
    assert [r["round"] for r in rounds] == ["1", "2", "3", "4"]
    assert all(r["selected"] == "15" for r in rounds)  # ceil(10 * 1.5)
    assert all(int(r["aggregated"]) <= 10 for r in rounds)
    assert sum(int(r["aggregated"]) for r in rounds) > 0  # clients are chosen among those online
    assert sum(float(r["round_duration_s"]) for r in rounds) == pytest.approx(
        float(rounds[-1]["sim_time_s"]), abs=0.01)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sim_time_s"] == pytest.approx(float(rows[1]["sim_time_s"]))
    assert summary["selector"] == "Oort" and summary["rounds_to_target"] == 2
    assert summary["trainer"] == "VectorizedTrainer"  # federated.vectorize auto
    assert summary["time_to_target"] == pytest.approx(float(rows[0]["sim_time_s"]))


def test_fedscale_pickles_need_the_explicit_flag(tmp_path, capsys):
    (tmp_path / "capacity").write_bytes(b"not read")
    assert _fit(tmp_path, "--systems.enabled", "true", "--run_dir", str(tmp_path / "run"),
                "--systems.fedscale_capacity", str(tmp_path / "capacity")) == 2
    assert "--systems.allow_pickle true" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_override_args_flatten_sections_into_options():
    from fltoolkit.run.fit import override_args

    assert override_args({"federated": {"rounds": 3, "local_tables": ["user"],
                                        "strategy": {"init_args": {"server_lr": 0.5}}},
                          "seed": 1, "run_dir": "x"}) == [
        "--federated.rounds", "3", "--federated.local_tables", '["user"]',
        "--federated.strategy.init_args.server_lr", "0.5", "--seed", "1", "--run_dir", "x"]


@pytest.mark.slow
def test_python_entry_point_returns_the_run_directory_summary_and_metrics(tmp_path):
    import fltoolkit

    result = fltoolkit.fit(EXPERIMENT, "--data.init_args.cache_dir", str(tmp_path / "cache"),
                           data={"num_rows": 10000}, run_dir=str(tmp_path / "run"),
                           federated={"rounds": 4, "eval_interval": 2})
    assert result.run_dir == tmp_path / "run"
    assert result.metrics["round"].to_list() == [2, 4]
    assert result.summary["rounds"] == 4
    assert result.summary["validation"]["auc"] == pytest.approx(result.metrics["auc"][-1],
                                                                abs=1e-9)
