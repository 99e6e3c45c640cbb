"""The plug-in example (examples/plugin) end to end, and the commands of its walkthrough.

Run in-process like tests/test_cli.py; the doc's `fltk fit` lines are parsed and run as
written (from a copy of the repository layout in tmp_path), so the doc cannot drift.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from fltoolkit.run.cli import main
from recsys.parts import split_parameters

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXPERIMENT = EXAMPLES / "plugin" / "toy.yaml"
DOC = ROOT / "docs" / "custom_data_and_model.md"


def _doc_commands() -> list[list[str]]:
    """Every `fltk fit` line of the doc's fenced bash blocks, tokenized."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines()
            if " fltk fit " in f" {line} "]


@pytest.mark.slow
def test_toy_dcn_federates_two_rounds(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from plugin.dcn import DCNModule
    from plugin.toy_data import ToyClicksDataModule

    run = tmp_path / "run"
    assert main(["fit", "--experiment", str(EXPERIMENT), "--run_dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["rounds"] == 2
    assert 0.5 < summary["auc"] <= 1.0 and 0.5 < summary["oracle_auc"] <= 1.0

    # the DCN's tables are found where federation looks for them, named like the features
    data = ToyClicksDataModule()
    data.setup()
    model = DCNModule(embedding_dim=8, dense_hidden=[16], over_hidden=[32],
                      features=data.feature_spec)
    parts = split_parameters(model, data.feature_spec.sparse)
    assert sorted(parts.tables) == ["category", "item", "user"]
    # uploads exceed the dense parameters alone: table rows travelled too
    dense_bytes = sum(p.numel() * p.element_size() for p in parts.dense)
    assert summary["bytes_up_per_round"] > summary["clients_per_round"] * dense_bytes
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert any(key.startswith("model.inter_arch.crossnet.") for key in final)
    assert final["model.sparse_arch.embedding_bag_collection.embedding_bags.user.weight"].shape \
        == (200, 8)


@pytest.mark.slow
def test_doc_commands_run_as_written(tmp_path, monkeypatch):
    """The doc's commands assume the repository root as working directory: mirror it."""
    commands = _doc_commands()
    assert len(commands) >= 2
    (tmp_path / "examples").symlink_to(EXAMPLES)
    monkeypatch.chdir(tmp_path)
    for index, command in enumerate(commands):
        env = [token for token in command if re.fullmatch(r"[A-Z_]+=\S*", token)]
        assert command[len(env)] == "fltk", command
        for assignment in env:
            name, value = assignment.split("=", 1)
            assert name == "PYTHONPATH", f"unsupported variable in the doc: {name}"
            monkeypatch.syspath_prepend(os.path.abspath(value))
        assert main(command[len(env) + 1:]) == 0, command
        run = tmp_path / "runs" / "toy" / f"version_{index}"
        assert "auc" in json.loads((run / "summary.json").read_text()), command
