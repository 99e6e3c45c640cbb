"""Synthetic Criteo data: the real format, deterministic, with an oracle the datamodule reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.criteo import CriteoDataModule
from datamodules.synthetic_criteo import CLICK_RATE, GENERATOR_VERSION, generate_criteo
from fltoolkit.run.cli import main

ROWS = 5000


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("criteo")
    return out, generate_criteo(out, num_rows=ROWS, seed=0)


def test_lines_have_the_real_format(generated):
    out, _ = generated
    text = (out / "train.txt").read_text()
    lines = text.splitlines()
    assert len(lines) == ROWS
    fields = [line.split("\t") for line in lines]
    assert {len(f) for f in fields} <= set(range(37, 41))
    assert len({len(f) for f in fields}) > 1  # some lines have trailing empty fields stripped
    assert '"' not in text
    assert any(int(f[2]) < 0 for f in fields if f[2])  # negative integers in I2
    assert any("" in f[1:14] for f in fields) and any("" in f[14:] for f in fields)
    assert all(len(c) == 8 and int(c, 16) >= 0 for f in fields for c in f[14:] if c)
    assert abs(sum(f[0] == "1" for f in fields) / ROWS - CLICK_RATE) < 0.03


def test_meta_records_the_oracle(generated):
    out, meta = generated
    assert json.loads((out / "synthetic_meta.json").read_text()) == meta
    assert meta["oracle_auc"] > 0.7
    assert (meta["num_rows"], meta["seed"], meta["generator_version"]) == (
        ROWS, 0, GENERATOR_VERSION)


def test_same_seed_same_bytes(generated, tmp_path):
    out, _ = generated
    generate_criteo(tmp_path / "again", num_rows=ROWS, seed=0)
    generate_criteo(tmp_path / "other", num_rows=ROWS, seed=1)
    first = (out / "train.txt").read_bytes()
    assert (tmp_path / "again" / "train.txt").read_bytes() == first
    assert (tmp_path / "other" / "train.txt").read_bytes() != first


def test_datamodule_generates_and_reads_it(tmp_path):
    cache = tmp_path / "cache"
    dm = CriteoDataModule(num_rows=ROWS, num_clients=10, cache_dir=str(cache))
    dm.setup()
    sizes = (dm.data.train.num_rows, dm.data.validation.num_rows, dm.data.test.num_rows)
    assert sizes == (ROWS * 81 // 100, ROWS * 9 // 100, ROWS // 10)  # 0.9 * 0.9, 0.9 * 0.1, 0.1
    assert dm.data.info["oracle_auc"] > 0.7
    assert dm.feature_spec.cardinalities[2] > 100  # a high-cardinality column
    generated = list((cache / "synthetic").iterdir())
    assert [p.name for p in generated] == [f"criteo-{ROWS}-0-{GENERATOR_VERSION}"]


@pytest.mark.slow
def test_federated_run_of_the_experiment_learns_the_planted_model(tmp_path):
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "criteo.yaml"
    run = tmp_path / "run"
    assert main(["fit", "--experiment", str(experiment), "--data.num_rows", "30000",
                 "--data.num_clients", "100", "--data.init_args.cache_dir", str(tmp_path),
                 "--federated.rounds", "10", "--run_dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["oracle_auc"] > 0.79
    assert summary["auc"] > 0.64  # 0.666 measured; a model that learned nothing gives 0.5
