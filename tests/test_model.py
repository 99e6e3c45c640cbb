"""The DLRM module: logits out, sparse table gradients, one closure per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.base import FeatureSpec
from recsys.dlrm import SingleIdFeatures
from recsys.module import CTRModule
from recsys.optim import DenseSparseOptimizer

SPEC = FeatureSpec(["user", "item"], [10, 20], ["price"])


def _module() -> CTRModule:
    torch.manual_seed(0)
    return CTRModule(embedding_dim=4, dense_hidden=[8], over_hidden=[8], features=SPEC)


def test_model_returns_raw_logits_without_sigmoid():
    module = _module()
    last = module.model.over_arch.model[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(5.0)
    logits = module(torch.randn(3, 1), torch.tensor([[1, 2], [3, 4], [5, 6]]))
    assert logits.shape == (3,)
    assert torch.allclose(logits, torch.full((3,), 5.0))  # a sigmoid would give 0.9933


def test_output_bias_starts_at_the_logit_of_the_click_rate():
    torch.manual_seed(0)
    spec = FeatureSpec(["user", "item"], [10, 20], ["price"], label_mean=0.2)
    module = CTRModule(embedding_dim=4, dense_hidden=[8], over_hidden=[8], features=spec,
                       prior_bias=True)
    assert module.model.over_arch.model[-1].bias.item() == pytest.approx(math.log(0.2 / 0.8))
    default = CTRModule(embedding_dim=4, dense_hidden=[8], over_hidden=[8], features=spec)
    assert abs(default.model.over_arch.model[-1].bias.item() - math.log(0.2 / 0.8)) > 1
    with pytest.raises(ValueError, match="label_mean"):
        FeatureSpec(["user"], [10], label_mean=1.0)


def test_kjt_holds_each_feature_ids_in_key_major_order():
    kjt = SingleIdFeatures(["user", "item"])(torch.tensor([[1, 7], [2, 8], [3, 9]]))
    assert kjt.keys() == ["user", "item"]
    assert kjt["user"].values().tolist() == [1, 2, 3]
    assert kjt["item"].values().tolist() == [7, 8, 9]


def test_tables_get_sparse_gradients_touching_only_batch_rows():
    module = _module()
    loss = module.loss(module(torch.randn(2, 1), torch.tensor([[1, 2], [3, 2]])),
                       torch.tensor([1.0, 0.0]))
    loss.backward()
    grad = module.model.sparse_arch.embedding_bag_collection.embedding_bags["user"].weight.grad
    assert grad.is_sparse
    assert sorted(grad.coalesce().indices()[0].tolist()) == [1, 3]


def test_combined_optimizer_runs_the_closure_once_and_steps_both_parts():
    module = _module()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, DenseSparseOptimizer)
    assert isinstance(optimizer.dense, torch.optim.Adam)
    assert isinstance(optimizer.sparse, torch.optim.Adagrad)
    table = module.model.sparse_arch.embedding_bag_collection.embedding_bags["user"].weight
    mlp = module.model.over_arch.model[-1].weight
    before_table, before_mlp = table.detach().clone(), mlp.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = module.loss(module(torch.randn(2, 1), torch.tensor([[1, 2], [3, 2]])),
                           torch.tensor([1.0, 0.0]))
        loss.backward()
        return loss

    optimizer.step(closure)
    assert len(calls) == 1
    changed_rows = (table.detach() != before_table).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [1, 3]  # untouched rows stay put
    assert not torch.equal(mlp.detach(), before_mlp)


def test_centralized_training_learns_a_planted_signal():
    torch.manual_seed(0)
    users = torch.randint(0, 8, (2048,))
    items = torch.randint(0, 16, (2048,))
    labels = ((users + items) % 2 == 0).float()  # needs the user-item interaction
    module = CTRModule(embedding_dim=4, dense_hidden=[8], over_hidden=[16], features=FeatureSpec(
        ["user", "item"], [8, 16], []),
        sparse_optimizer=lambda p: torch.optim.Adagrad(p, lr=0.3),
        dense_optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    optimizer = module.configure_optimizers()
    sparse = torch.stack([users, items], dim=1)
    dense = torch.zeros(2048, 0)
    for _ in range(15):
        for idx in torch.randperm(2048).split(64):
            optimizer.zero_grad()
            module.loss(module(dense[idx], sparse[idx]), labels[idx]).backward()
            optimizer.step()
    from recsys.metrics import auc
    with torch.no_grad():
        assert auc(module(dense, sparse), labels) > 0.95


def test_the_dense_arch_gets_one_constant_column_when_there_are_no_dense_features():
    from recsys.dlrm import dense_input

    features = torch.randn(4, 3)
    assert dense_input(features) is features
    for shape in ((4, 0), (2, 5, 0)):  # a batch, and a bucket of clients' padded batches
        constant = dense_input(torch.empty(shape))
        assert constant.shape == (*shape[:-1], 1) and not constant.any()
