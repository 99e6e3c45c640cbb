"""The meta build and the piecewise replay of TorchRec's default table init match a CPU build."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from recsys import table_init
from recsys.table_init import Target, embedding_bag_collection, fill_initial, tables_on_meta


def _configs(rows: list[int], dim: int) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n,
                               feature_names=[f"t{i}"]) for i, n in enumerate(rows)]


@pytest.mark.parametrize("dim", [4, 3])
def test_meta_build_replays_the_cpu_build_in_pieces(monkeypatch, dim):
    monkeypatch.setattr(table_init, "BLOCK_ROWS", 64)  # several blocks, a short last one
    rows = [200, 129, 70]
    torch.manual_seed(4)
    cpu = embedding_bag_collection(_configs(rows, dim))
    after_cpu = torch.rand(3)
    torch.manual_seed(4)
    with tables_on_meta():
        meta = embedding_bag_collection(_configs(rows, dim))
    assert meta.embedding_bags["t0"].weight.is_meta
    assert torch.equal(torch.rand(3), after_cpu)  # the generator ends where the CPU build's did
    weights = {n: cpu.embedding_bags[n].weight.detach() for n in ("t0", "t1", "t2")}
    pieces = {"t1": [Target(torch.empty(60, 2), row=50, column=1), Target(torch.empty(129, dim))],
              "t0": [Target(torch.empty(1, dim), row=199)]}
    for source in (meta, cpu):
        fill_initial(source, pieces)
        assert torch.equal(pieces["t1"][0].out, weights["t1"][50:110, 1:3])
        assert torch.equal(pieces["t1"][1].out, weights["t1"])
        assert torch.equal(pieces["t0"][0].out, weights["t0"][199:])


def test_a_custom_init_is_refused_on_meta():
    configs = _configs([10], 4)
    configs[0].init_fn = torch.nn.init.zeros_
    with tables_on_meta(), pytest.raises(ValueError, match="'t0'.*default uniform"):
        embedding_bag_collection(configs)
