"""The federated loop: clients leave the global model untouched, updates hold only touched
rows, FedProx pulls toward the global weights, local tables never leave a client, and a run
learns and is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltoolkit.loop import FederatedLoop
from fltoolkit.run.config import FederatedConfig
from fltoolkit.server.tables import ServerTables
from fltoolkit.strategies import FedAvg, FedYogi
from fltoolkit.systems.clock import client_seconds
from fltoolkit.training.cohort import CohortPlanner, LocalSchedule, client_seed
from fltoolkit.training.trainer import CohortTrainer
from fltoolkit.training.updates import ClientUpdate, SparseRows
from recsys.module import CTRModule
from recsys.parts import split_parameters


def _module(data, seed: int = 0, optimizers=None, features="data") -> CTRModule:
    """A small DLRM with plain SGD locally (no optimizer state to carry between clients)
    unless `optimizers` gives the (dense, sparse) optimizer callables; built for the data's
    features unless `features` is None."""
    torch.manual_seed(seed)
    dense, sparse = optimizers or (lambda p: torch.optim.SGD(p, lr=0.3),
                                   lambda p: torch.optim.SGD(p, lr=10.0))
    return CTRModule(embedding_dim=8, dense_hidden=[16], over_hidden=[32],
                     features=data.features if features == "data" else features,
                     dense_optimizer=dense, sparse_optimizer=sparse)


def _state(module: CTRModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Clients:
    """A planner and a trainer over one module, training cohorts the way the loop does."""

    def __init__(self, data, module, **kwargs) -> None:
        parts = split_parameters(module, data.features.sparse)
        local = kwargs["local_tables"].initial if kwargs.get("local_tables") else {}
        served = ServerTables({name: part.weight.detach() for name, part in parts.tables.items()
                               if name not in local})
        self.planner = CohortPlanner(data.train, parts.tables,
                                     LocalSchedule(batch_size=4, local_steps=3),
                                     [name for name in parts.tables if name not in local],
                                     parts.dense, seed=0)
        self.trainer = CohortTrainer(module, parts, served, **kwargs)

    def train_round(self, clients: list[int], seeds: list[int]) -> list[ClientUpdate]:
        updates = self.trainer.train_round(self.planner.plan(clients, seeds))
        self.trainer.keep(clients)
        return updates


def _trainer(data, module, **kwargs) -> _Clients:
    return _Clients(data, module, **kwargs)


def _train_one(trainer: _Clients, client: int, seed: int) -> ClientUpdate:
    return trainer.train_round([client], [seed])[0]


def test_schedule_handles_clients_smaller_than_a_batch():
    generator = torch.Generator().manual_seed(0)
    batches = LocalSchedule(batch_size=32, local_steps=3).batches(5, generator)
    assert [sorted(b.tolist()) for b in batches] == [[0, 1, 2, 3, 4]] * 3
    epochs = LocalSchedule(batch_size=2, local_epochs=2).batches(5, generator)
    assert [len(b) for b in epochs] == [2, 2, 1, 2, 2, 1]


def test_client_training_leaves_the_global_model_unchanged(synthetic_data):
    module = _module(synthetic_data)
    trainer = _trainer(synthetic_data, module)
    before = _state(module)
    update = _train_one(trainer, client=3, seed=11)
    after = _state(module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert update.dense.abs().sum() > 0
    # a second run of the same client from the same state gives the same update: the local
    # optimizer state was reset, not carried over
    again = _train_one(trainer, client=3, seed=11)
    assert torch.equal(update.dense, again.dense)
    for name, rows in update.tables.items():
        assert torch.equal(rows.values, again.tables[name].values)


@pytest.mark.parametrize("stateful", [False, True])
def test_a_cohort_trains_each_client_as_if_it_were_alone(synthetic_data, stateful):
    """Clients share one compact buffer per table and one optimizer per round; none may see
    another's rows or optimizer state (Adam's lazy moments, Adagrad's eager sums)."""
    module = _module(synthetic_data)
    if stateful:
        module.dense_optimizer = lambda p: torch.optim.Adam(p, lr=1e-2)
        module.sparse_optimizer = lambda p: torch.optim.Adagrad(p, lr=0.1)
    trainer = _trainer(synthetic_data, module)
    clients, seeds = [7, 2, 9], [1, 2, 3]
    together = trainer.train_round(clients, seeds)
    for update, client, seed in zip(together, clients, seeds, strict=True):
        alone = _train_one(trainer, client, seed)
        assert update.client == alone.client and update.loss == pytest.approx(alone.loss)
        torch.testing.assert_close(update.dense, alone.dense)
        for name, rows in alone.tables.items():
            assert torch.equal(update.tables[name].ids, rows.ids)
            torch.testing.assert_close(update.tables[name].values, rows.values)


def test_kept_optimizer_state_carries_a_clients_adam_moments_to_its_next_round(synthetic_data):
    from fltoolkit.training.optimizer_state import ClientOptimizerStates

    module = _module(synthetic_data)
    module.dense_optimizer = lambda p: torch.optim.Adam(p, lr=1e-3)
    module.sparse_optimizer = lambda p: torch.optim.Adagrad(p, lr=0.1)
    states = ClientOptimizerStates()
    trainer = _trainer(synthetic_data, module, optimizer_states=states)
    fresh = _trainer(synthetic_data, module)
    first = _train_one(trainer, client=4, seed=1)
    assert torch.equal(first.dense, _train_one(fresh, client=4, seed=1).dense)  # nothing kept yet
    adam, adagrad = states.states[4]
    assert all(float(state["step"]) == 3 for state in adam.values())  # 3 local steps
    user = module.model.sparse_arch.embedding_bag_collection.embedding_bags["user"].weight
    kept_sums = adagrad[user]["sum"]
    assert kept_sums.ids.tolist() == first.tables["user"].ids.tolist()
    assert bool((kept_sums.values > 0).all())  # squared gradients of the rows it trained
    second = _train_one(trainer, client=4, seed=1)
    assert all(float(state["step"]) == 6 for state in states.states[4][0].values())
    # same weights, same batches: only the carried state makes the second update differ
    assert not torch.equal(second.dense, first.dense)


def test_update_carries_exactly_the_rows_the_client_touched(synthetic_data):
    module = _module(synthetic_data)
    update = _train_one(_trainer(synthetic_data, module), client=5, seed=1)
    client_ids = synthetic_data.train.sparse[synthetic_data.train.client_rows(5)]
    for column, name in enumerate(synthetic_data.features.sparse):
        assert update.tables[name].ids.tolist() == torch.unique(client_ids[:, column]).tolist()
    embedding_dim = 8
    rows = sum(r.ids.numel() for r in update.tables.values())
    assert update.upload_bytes() == update.dense.numel() * 4 + rows * (8 + 4 * embedding_dim)


def test_fedprox_term_pulls_toward_the_global_weights(synthetic_data):
    module = _module(synthetic_data)
    free = _train_one(_trainer(synthetic_data, module), client=2, seed=5)
    pulled = _train_one(_trainer(synthetic_data, module, proximal_mu=0.05), client=2, seed=5)
    pushed = _train_one(_trainer(synthetic_data, module, proximal_mu=-0.05), client=2, seed=5)
    assert pulled.dense.norm() < free.dense.norm() < pushed.dense.norm()
    for name in free.tables:
        assert pulled.tables[name].values.norm() < free.tables[name].values.norm()


def _loop(data, seed: int = 0, systems=None, optimizers=None, privacy=None, embeddings=None,
          **kwargs) -> FederatedLoop:
    """A loop over `_module`; with `embeddings`, its shared tables built to their budget."""
    config = FederatedConfig(**{"rounds": 4, "clients_per_round": 20, "eval_interval": 2,
                                "batch_size": 16, **kwargs})
    if embeddings is None or not embeddings.enabled:
        module = _module(data, seed, optimizers)
    else:
        from fltoolkit.embeddings.physical import configure_budgeted_features

        module = _module(data, seed, optimizers, features=None)
        configure_budgeted_features(module, data.features, embeddings,
                                    config.local_table_names(data.features.sparse, False))
    return FederatedLoop(module, data, config, seed=seed, systems=systems, privacy=privacy,
                         embeddings=embeddings)


def test_local_tables_never_leave_the_client(synthetic_data):
    loop = _loop(synthetic_data, local_tables=["user"])
    user_table = loop.parts.tables["user"].weight
    initial_user = user_table.detach().clone()
    sent: list[ClientUpdate] = []
    aggregate = loop.strategy.aggregate
    loop.strategy.aggregate = lambda updates, server: (sent.extend(updates),
                                                       aggregate(updates, server))
    loop.run()
    assert sent and all("user" not in u.tables for u in sent)
    assert all("adgroup_id" in u.tables for u in sent)
    assert "user" not in loop.server_tables.names
    assert torch.equal(user_table.detach(), initial_user)  # the server's copy never trained
    stored = loop.local_tables.rows["user"]
    assert set(stored) == set(torch.nonzero(torch.tensor(loop.participation)).flatten().tolist())
    client, rows = next(iter(stored.items()))
    assert not torch.equal(rows.values, initial_user[rows.ids])  # trained on the client


def test_local_rows_score_their_clients_test_rows(synthetic_data):
    from fltoolkit.server.evaluation import evaluate

    loop = _loop(synthetic_data, local_tables=["user"])
    loop.run()
    data = synthetic_data
    with_local = evaluate(loop.module, loop.parts, data.test, 4096, data.train.client_ids,
                          loop.local_tables)
    server_only = evaluate(loop.module, loop.parts, data.test, 4096, data.train.client_ids)
    assert with_local.metrics["logloss"] != server_only.metrics["logloss"]


def test_federated_run_learns_and_is_deterministic(synthetic_data):
    settings = {"rounds": 6, "clients_per_round": 40, "eval_interval": 3, "local_epochs": 3}
    first = _loop(synthetic_data, **settings)
    row = first.run()
    assert first.history[0]["auc"] < row["auc"] and row["auc"] > 0.6
    assert row["bytes_up_per_round"] > 0 and row["clients_seen"] > 40
    second = _loop(synthetic_data, **settings).run()
    row.pop("wall_time_s"), second.pop("wall_time_s")
    assert second == row


@pytest.mark.parametrize("strategy, proximal_mu", [(FedYogi(server_lr=0.01), 0.0),
                                                   (FedAvg(), 0.01)])
def test_other_strategies_run_through_the_loop(synthetic_data, strategy, proximal_mu):
    loop = _loop(synthetic_data, strategy=strategy, proximal_mu=proximal_mu)
    assert 0.0 < loop.run()["auc"] < 1.0


def test_non_finite_updates_are_rejected(synthetic_data):
    loop = _loop(synthetic_data, rounds=1)
    train_round = loop.trainer.train_round
    poisoned_clients = []

    def poisoned(cohort) -> list[ClientUpdate]:
        poisoned_clients.extend(c for c in cohort.clients if c % 2)
        return [ClientUpdate(u.client, u.num_samples, float("nan"), u.dense, u.tables)
                if u.client % 2 else u for u in train_round(cohort)]

    loop.trainer.train_round = poisoned
    stats = loop.run_round(1)
    assert stats.rejected == len(poisoned_clients) > 0
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in loop.module.parameters()])).all()


def test_clients_per_round_larger_than_population_is_a_config_error(synthetic_data):
    from fltoolkit.run.config import ConfigError

    with pytest.raises(ConfigError, match="exceeds the"):
        _loop(synthetic_data, clients_per_round=10**6)


def test_sparse_rows_bytes():
    rows = SparseRows(torch.tensor([1, 5]), torch.zeros(2, 4))
    assert rows.num_bytes() == 2 * 8 + 2 * 4 * 4


def test_payloads_known_before_training_match_the_updates(synthetic_data):
    loop = _loop(synthetic_data, local_tables=["user"])
    cohort = loop.planner.plan([3, 8, 1], [5, 6, 7])
    samples = np.array(cohort.samples_trained)
    updates = loop.trainer.train_round(cohort)
    assert cohort.upload_bytes.tolist() == [u.upload_bytes() for u in updates]
    assert cohort.download_bytes.tolist() == [u.download_bytes for u in updates]
    assert samples.tolist() == [u.num_samples for u in updates]  # one local epoch


def test_a_cohorts_subset_is_the_plan_of_those_clients_alone(synthetic_data):
    planner = _loop(synthetic_data, local_tables=["user"]).planner
    whole = planner.plan([3, 8, 1, 5], [5, 6, 7, 8])
    alone = planner.plan([8, 5], [6, 8])
    part = whole.subset([1, 3])
    assert part.clients == alone.clients and part.steps == alone.steps
    assert part.download_bytes.tolist() == alone.download_bytes.tolist()
    assert part.upload_bytes.tolist() == alone.upload_bytes.tolist()
    for name, ids in alone.row_ids.items():
        assert torch.equal(part.row_ids[name], ids) and part.segments[name] == alone.segments[name]
    for field in ("dense", "sparse", "label"):
        assert torch.equal(getattr(part, field), getattr(alone, field)), field


def test_systems_over_commit_trains_only_the_fastest_and_advances_the_clock(synthetic_data):
    from fltoolkit.systems.config import SystemsConfig

    systems = SystemsConfig(enabled=True, availability=False, over_commit=2.0)
    loop = _loop(synthetic_data, rounds=1, local_epochs=1, systems=systems)
    trained = []
    train_round = loop.trainer.train_round
    loop.trainer.train_round = lambda cohort: (trained.extend(cohort.clients),
                                               train_round(cohort))[1]
    observed = {}
    loop.selector.feedback = lambda round_index, updates, durations: observed.update(durations)
    stats = loop.run_round(1)
    assert len(trained) == 20 and stats.stragglers == 20 and stats.dropped == 0
    # the kept clients are the 20 fastest of the 40 selected, by the clock's own arithmetic
    again = _loop(synthetic_data, rounds=1, local_epochs=1, systems=systems)
    selected = again.selector.select(1, 40)
    seeds = [client_seed(0, 1, c) for c in selected.tolist()]
    cohort = again.planner.plan(selected.tolist(), seeds)
    seconds = client_seconds(again.admission.population, selected, cohort.download_bytes,
                             np.array(cohort.samples_trained), cohort.upload_bytes)
    assert sorted(trained) == sorted(selected[np.argsort(seconds)[:20]].tolist())
    assert loop.admission.sim_time_s == pytest.approx(np.sort(seconds)[19])
    # the selector learns every finisher's time, stragglers' too (Oort penalizes slow ones)
    assert observed == pytest.approx(dict(zip(selected.tolist(), seconds.tolist(), strict=True)))


def test_round_finiteness_check_flags_exactly_the_clients_with_a_bad_delta():
    from fltoolkit.training.cohort import Cohort
    from fltoolkit.training.trainer import _finite_per_client

    cohort = Cohort(clients=[4, 9, 2], num_samples=[1, 1, 1], samples_trained=[1, 1, 1],
                    download_bytes=np.zeros(3, dtype=np.int64),
                    upload_bytes=np.zeros(3, dtype=np.int64), dense=torch.zeros(0, 1),
                    sparse=torch.zeros(0, 1), label=torch.zeros(0), steps=[[], [], []],
                    row_ids={"t": torch.arange(5)}, segments={"t": [0, 2, 3, 5]},
                    columns={"t": [0]})
    dense = torch.zeros(3, 4)
    table = torch.zeros(5, 2)
    table[2, 1] = float("nan")  # the row of the second client (segment 2:3)
    assert _finite_per_client(cohort, dense, {"t": table}, [0.1, 0.2, 0.3]) == [True, False,
                                                                                True]
    dense[2, 0] = float("inf")
    assert _finite_per_client(cohort, dense, {"t": table}, [float("nan"), 0.2, 0.3]) == [
        False, False, False]


def test_a_rejected_client_keeps_nothing_of_the_round(synthetic_data):
    """Local rows and kept optimizer state are stored only for accepted updates: a client
    whose update the gate refused (here: NaN) is exactly as it was before the round."""
    loop = _loop(synthetic_data, rounds=1, local_tables=["user"], keep_optimizer_state=True,
                 optimizers=(lambda p: torch.optim.SGD(p, lr=0.3),
                             lambda p: torch.optim.Adagrad(p, lr=0.1)))
    train_round = loop.trainer.train_round

    def poisoned(cohort) -> list[ClientUpdate]:
        return [u.scaled(float("nan")) if u.client % 2 else u for u in train_round(cohort)]

    loop.trainer.train_round = poisoned
    stats = loop.run_round(1)
    trained = np.flatnonzero(loop.participation).tolist()
    rejected = [client for client in trained if client % 2]
    assert stats.rejected == len(rejected) > 0
    assert set(loop.local_tables.rows["user"]) == set(trained) - set(rejected)
    assert set(loop.trainer.optimizer_states.states) == set(trained) - set(rejected)
