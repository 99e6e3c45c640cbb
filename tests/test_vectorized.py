"""Vectorized cohorts: the clients of a round stepping together give the updates they give
one after another, and what cannot vectorize yet says why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.server.tables import ServerTables
from fltoolkit.training.cohort import CohortPlanner, LocalSchedule
from fltoolkit.training.trainer import CohortTrainer
from fltoolkit.training.vectorized import (
    StepPlan,
    VectorizedTrainer,
    trainer_for,
    vectorization_blockers,
)
from recsys.module import CTRModule
from recsys.parts import split_parameters


def _module(data, embedding_l2: float = 0.0) -> CTRModule:
    torch.manual_seed(0)
    return CTRModule(embedding_dim=8, dense_hidden=[16], over_hidden=[32], features=data.features,
                     embedding_l2=embedding_l2,
                     dense_optimizer=lambda p: torch.optim.SGD(p, lr=0.3),
                     sparse_optimizer=lambda p: torch.optim.SGD(p, lr=2.0))


def _updates(trainer_type, data, module, schedule, clients, seeds, proximal_mu=0.0,
             local=()):
    """Two rounds of the same clients (the second starts from the local rows the first
    kept); the second round's updates and the local rows kept after it."""
    parts = split_parameters(module, data.features.sparse)
    store = LocalTableStore({name: parts.tables[name].weight for name in local}) if local \
        else None
    served = ServerTables({name: part.weight.detach() for name, part in parts.tables.items()
                           if name not in local})
    planner = CohortPlanner(data.train, parts.tables, schedule,
                            [name for name in parts.tables if name not in local],
                            sum(p.numel() * 4 for p in parts.dense), seed=0)
    trainer = trainer_type(module, parts, served, proximal_mu=proximal_mu, local_tables=store)
    for round_seeds in ([seed + 100 for seed in seeds], seeds):
        updates = trainer.train_round(planner.plan(clients, round_seeds))
        trainer.keep(clients)
    return updates, store


@pytest.mark.parametrize("schedule, embedding_l2, proximal_mu, local", [
    (LocalSchedule(batch_size=4, local_epochs=2), 0.0, 0.0, ()),
    (LocalSchedule(batch_size=8, local_steps=3), 0.01, 0.0, ()),
    (LocalSchedule(batch_size=4, local_epochs=2), 0.01, 0.1, ()),
    (LocalSchedule(batch_size=8, local_steps=3), 0.0, 0.1, ("user",)),
])
def test_vectorized_updates_equal_the_sequential_ones(synthetic_data, schedule, embedding_l2,
                                                      proximal_mu, local):
    """Clients of very different sizes (some run out of local steps long before others), the
    embedding L2 term, FedProx, a local table, losses and Oort's squared sample losses."""
    sizes = synthetic_data.train.client_sizes()
    clients = [int(torch.argmax(sizes)), 3, 11, int(torch.argmin(sizes)), 40]
    seeds = [5, 6, 7, 8, 9]
    module = _module(synthetic_data, embedding_l2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    sequential, kept = _updates(CohortTrainer, synthetic_data, module, schedule, clients, seeds,
                                proximal_mu, local)
    together, kept_together = _updates(VectorizedTrainer, synthetic_data, module, schedule,
                                       clients, seeds, proximal_mu, local)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    for name in local:
        for client in clients:
            torch.testing.assert_close(kept_together.rows[name][client].values,
                                       kept.rows[name][client].values, rtol=1e-5, atol=1e-6)
    for one, other in zip(sequential, together, strict=True):
        assert one.client == other.client and one.num_samples == other.num_samples
        torch.testing.assert_close(other.dense, one.dense, rtol=1e-5, atol=1e-6)
        assert other.tables.keys() == one.tables.keys()
        for name, rows in one.tables.items():
            assert torch.equal(other.tables[name].ids, rows.ids)
            torch.testing.assert_close(other.tables[name].values, rows.values, rtol=1e-5,
                                       atol=1e-6)
        assert other.loss == pytest.approx(one.loss, rel=1e-5)
        assert other.loss_squared_sum == pytest.approx(one.loss_squared_sum, rel=1e-4)
        assert other.download_bytes == one.download_bytes and other.finite == one.finite


def test_what_does_not_vectorize_is_named(synthetic_data):
    module = _module(synthetic_data)
    assert vectorization_blockers(module, False) == []
    module.sparse_optimizer = lambda p: torch.optim.Adagrad(p, lr=0.1)
    assert vectorization_blockers(module, True) == [
        "optimizer: Adagrad is not vectorized yet (plain SGD is)",
        "federated.keep_optimizer_state is not vectorized yet"]
    with pytest.raises(ConfigError, match="federated.vectorize true: optimizer: Adagrad"):
        trainer_for(module, FederatedConfig(vectorize=True))
    assert trainer_for(module, FederatedConfig(vectorize="auto")) is CohortTrainer
    assert trainer_for(_module(synthetic_data),
                       FederatedConfig(vectorize="auto")).func is VectorizedTrainer
    assert trainer_for(_module(synthetic_data), FederatedConfig()).func is VectorizedTrainer
    assert trainer_for(_module(synthetic_data),
                       FederatedConfig(vectorize=False)) is CohortTrainer


def test_a_vectorized_run_learns_like_the_sequential_one(synthetic_data):
    from tests.test_federated import _loop

    settings = {"rounds": 6, "clients_per_round": 40, "eval_interval": 3, "local_epochs": 3}
    sequential = _loop(synthetic_data, **settings).run()
    together = _loop(synthetic_data, vectorize=True, **settings)
    assert isinstance(together.trainer, VectorizedTrainer)
    assert together.run()["auc"] == pytest.approx(sequential["auc"], abs=0.003)


def test_the_dcn_plugin_vectorizes_with_its_cross_network_per_client(synthetic_data):
    """DLRM_DCN's interaction arch has weights of its own: each client trains its copy."""
    from examples.plugin.dcn import DCNModule

    torch.manual_seed(0)
    module = DCNModule(embedding_dim=8, dense_hidden=[16], over_hidden=[32],
                       features=synthetic_data.features,
                       dense_optimizer=lambda p: torch.optim.SGD(p, lr=0.3),
                       sparse_optimizer=lambda p: torch.optim.SGD(p, lr=2.0))
    assert vectorization_blockers(module, False) == []
    schedule = LocalSchedule(batch_size=4, local_steps=3)
    sequential, _ = _updates(CohortTrainer, synthetic_data, module, schedule, [3, 11], [1, 2])
    together, _ = _updates(VectorizedTrainer, synthetic_data, module, schedule, [3, 11], [1, 2])
    for one, other in zip(sequential, together, strict=True):
        torch.testing.assert_close(other.dense, one.dense, rtol=1e-5, atol=1e-6)


def test_learning_rates_are_read_per_kind_of_parameter(synthetic_data):
    from fltoolkit.training.vectorized import sgd_learning_rates

    module = _module(synthetic_data)
    assert sgd_learning_rates(module) == (0.3, 2.0)
    module.dense_optimizer = lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9)
    assert "momentum" in sgd_learning_rates(module)
    one = _module(synthetic_data)
    one.configure_optimizers = lambda: torch.optim.SGD(one.parameters(), lr=0.5)
    assert sgd_learning_rates(one) == (0.5, 0.5)  # one optimizer for both kinds


def _plan_of(chunk_clients: int, min_saved: int) -> StepPlan:
    """Four clients laid out slot after slot: slot 0 has batches of 4 and 1 rows, slot 1 one
    of 3, slot 2 batches of 4, 4 and 2, slot 3 one of 1."""
    widths = [[4, 1], [3], [4, 4, 2], [1]]
    steps, row = [], 0
    for client in widths:
        steps.append([slice(row + sum(client[:k]), row + sum(client[:k + 1]))
                      for k in range(len(client))])
        row += sum(client)
    cohort = SimpleNamespace(steps=steps, samples_trained=[sum(w) for w in widths])
    return StepPlan(cohort, chunk_clients, min_saved)


def _described(plan: StepPlan) -> list:
    return [((stepping.start, stepping.stop),
             [((b.clients.start, b.clients.stop), b.rows.tolist(), b.mask.sum(1).tolist())
              for b in buckets]) for stepping, buckets in plan.steps]


def test_a_step_plan_puts_the_longest_clients_first_and_pads_by_bucket():
    plan = _plan_of(chunk_clients=4, min_saved=10**6)
    assert plan.order.tolist() == [2, 0, 1, 3] and plan.position.tolist() == [1, 2, 0, 3]
    assert plan.step_counts.tolist() == [3, 2, 1, 1]
    assert _described(plan) == [
        ((0, 4), [((0, 4), [[8, 9, 10, 11], [0, 1, 2, 3], [5, 6, 7, 0], [18, 0, 0, 0]],
                   [4, 4, 3, 1])]),
        ((0, 2), [((0, 2), [[12, 13, 14, 15], [4, 0, 0, 0]], [4, 1])]),
        ((0, 1), [((0, 1), [[16, 17]], [2])])]
    # padding the last client to 4 wastes 3 rows: worth a bucket of its own at min_saved 3
    split = _described(_plan_of(chunk_clients=4, min_saved=3))[0]
    assert split == ((0, 4), [((0, 3), [[8, 9, 10, 11], [0, 1, 2, 3], [5, 6, 7, 0]], [4, 4, 3]),
                              ((3, 4), [[18]], [1])])
    chunked = _described(_plan_of(chunk_clients=2, min_saved=10**6))
    assert [stepping for stepping, _ in chunked] == [(0, 2), (0, 2), (0, 1), (2, 4)]
    assert chunked[3][1] == [((2, 4), [[5, 6, 7], [18, 0, 0]], [3, 1])]


def test_chunks_of_one_client_give_the_updates_of_one_chunk(synthetic_data):
    """A memory budget so small that every client steps alone: the same updates."""
    from functools import partial

    sizes = synthetic_data.train.client_sizes()
    clients, seeds = [int(torch.argmax(sizes)), 3, 11, 40], [5, 6, 7, 8]
    schedule = LocalSchedule(batch_size=4, local_epochs=2)
    module = _module(synthetic_data)
    whole, _ = _updates(VectorizedTrainer, synthetic_data, module, schedule, clients, seeds, 0.1)
    alone = partial(VectorizedTrainer, memory_mb=1e-6)
    chunked, _ = _updates(alone, synthetic_data, module, schedule, clients, seeds, 0.1)
    for one, other in zip(whole, chunked, strict=True):
        torch.testing.assert_close(other.dense, one.dense, rtol=1e-5, atol=1e-6)
        for name, rows in one.tables.items():
            torch.testing.assert_close(other.tables[name].values, rows.values, rtol=1e-5,
                                       atol=1e-6)


def test_auto_falls_back_with_one_line_naming_why(synthetic_data, caplog):
    """A module that changes the training step trains one client after another."""

    class OwnStep(CTRModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    module = OwnStep(embedding_dim=8, dense_hidden=[16], over_hidden=[32],
                     features=synthetic_data.features)
    with caplog.at_level("INFO", logger="fltk"):
        assert trainer_for(module, FederatedConfig()) is CohortTrainer
    assert [r.getMessage() for r in caplog.records] == [
        "clients train one after another (federated.vectorize auto): "
        "OwnStep overrides CTRModule.training_step"]
