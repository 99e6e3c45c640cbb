"""Vectorized cohorts: the clients of a round stepping together give the updates they give
one after another, with every kind of local optimizer and kept optimizer state, and what
cannot vectorize says why."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.server.tables import ServerTables
from fltoolkit.training.cohort import CohortPlanner, LocalSchedule
from fltoolkit.training.optimizer_state import ClientOptimizerStates
from fltoolkit.training.step_plan import StepPlan
from fltoolkit.training.trainer import CohortTrainer
from fltoolkit.training.vectorized import (
    ARCHES,
    VectorizedTrainer,
    optimizer_rules,
    trainer_for,
    vectorization_blockers,
)
from recsys.module import CTRModule
from recsys.parts import split_parameters

optim = torch.optim
SGD = (lambda p: optim.SGD(p, lr=0.3), lambda p: optim.SGD(p, lr=2.0))
MOMENTUM = (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: optim.SGD(p, lr=0.5, momentum=0.8, dampening=0.3))
ADAM_ADAGRAD = (lambda p: optim.Adam(p, lr=0.01, weight_decay=0.01),
                lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1))
ADAMW_SPARSE_ADAM = (lambda p: optim.AdamW(p, lr=1e-3, amsgrad=True),
                     lambda p: optim.SparseAdam(p, lr=0.01))
MOMENTUM_ADAGRAD = (MOMENTUM[0], lambda p: optim.Adagrad(p, lr=0.1))
ADAPTIVE = {"adam-adagrad": ADAM_ADAGRAD, "adamw-sparseadam": ADAMW_SPARSE_ADAM}
OPTIMIZERS = {"sgd": SGD, "momentum": MOMENTUM, **ADAPTIVE}

SCENARIOS = {  # schedule, embedding_l2, proximal_mu, local tables
    "epochs": (LocalSchedule(batch_size=4, local_epochs=2), 0.0, 0.0, ()),
    "steps-l2": (LocalSchedule(batch_size=8, local_steps=3), 0.01, 0.0, ()),
    "fedprox": (LocalSchedule(batch_size=4, local_epochs=2), 0.01, 0.1, ()),
    "fedprox-local-table": (LocalSchedule(batch_size=8, local_steps=3), 0.0, 0.1, ("user",)),
}
SCENARIO = "schedule, embedding_l2, proximal_mu, local"
# very different sizes (256 rows to 2: the largest takes 128 steps with local_epochs 2, others
# run out of local steps long before it)
CLIENTS = "largest", 3, 11, "smallest", 40
SEEDS = [5, 6, 7, 8, 9]


def _module(data, embedding_l2: float = 0.0, optimizers=SGD) -> CTRModule:
    torch.manual_seed(0)
    return CTRModule(embedding_dim=8, dense_hidden=[16], over_hidden=[32], features=data.features,
                     embedding_l2=embedding_l2, dense_optimizer=optimizers[0],
                     sparse_optimizer=optimizers[1])


def _dense_in_float64(data, module: CTRModule):
    """The module's dense arches, and the data's dense features and labels, in float64 (the
    tables stay float32: torchrec pools in float32). The vmapped step and the sequential one
    round differently; in float32 an adaptive optimizer (Adam, Adagrad, SparseAdam: a step of
    about lr whatever the gradient's size) turns that noise into lr-sized steps where a
    gradient is noise-sized (a ReLU unit that is almost never active; FedProx's pull on a row
    that has hardly moved). In float64 the trainers then agree elementwise."""
    for arch in ARCHES:
        getattr(module.model, arch).double()
    train = dataclasses.replace(data.train, dense=data.train.dense.double(),
                                label=data.train.label.double())
    return dataclasses.replace(data, train=train)


def _clients(data) -> list[int]:
    sizes = data.train.client_sizes()
    picked = {"largest": int(torch.argmax(sizes)), "smallest": int(torch.argmin(sizes))}
    return [picked.get(client, client) for client in CLIENTS]


def _updates(trainer_type, data, module, schedule, clients, seeds, proximal_mu=0.0,
             local=(), optimizer_states=None, between_rounds=None):
    """Two rounds of the same clients (the second starts from the local rows and optimizer
    states the first kept); the second round's updates and the local rows kept after it.

    `trainer_type` may be a pair (one per round); `between_rounds(optimizer_states)` runs
    after the first round (a checkpoint's round trip)."""
    parts = split_parameters(module, data.features.sparse)
    store = LocalTableStore({name: parts.tables[name].weight for name in local}) if local \
        else None
    served = ServerTables({name: part.weight.detach() for name, part in parts.tables.items()
                           if name not in local})
    planner = CohortPlanner(data.train, parts.tables, schedule,
                            [name for name in parts.tables if name not in local],
                            parts.dense, seed=0)
    types = trainer_type if isinstance(trainer_type, tuple) else (trainer_type, trainer_type)
    for index, round_seeds in enumerate(([seed + 100 for seed in seeds], seeds)):
        trainer = types[index](module, parts, served, proximal_mu=proximal_mu,
                               local_tables=store, optimizer_states=optimizer_states)
        updates = trainer.train_round(planner.plan(clients, round_seeds))
        trainer.keep(clients)
        if between_rounds is not None and index == 0:
            between_rounds(optimizer_states)
    return updates, store


def _assert_close(value, expected, elementwise: bool) -> None:
    """Elementwise within 1e-5 relative (1e-6 absolute near zero), or in norm within 1e-4:
    adaptive optimizers in float32 (`_dense_in_float64`) stay within 1e-5 but for one table of
    the 128-step client with FedProx and SparseAdam (4e-5)."""
    value = value.to(expected.dtype)  # the sequential trainer keeps deltas in float32
    if elementwise:
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    else:
        assert float((value - expected).norm()) <= 1e-4 * float(expected.norm()) + 1e-7


def _assert_same_updates(sequential, together, elementwise: bool = True) -> None:
    for one, other in zip(sequential, together, strict=True):
        assert one.client == other.client and one.num_samples == other.num_samples
        _assert_close(other.dense, one.dense, elementwise)
        assert other.tables.keys() == one.tables.keys()
        for name, rows in one.tables.items():
            assert torch.equal(other.tables[name].ids, rows.ids)
            _assert_close(other.tables[name].values, rows.values, elementwise)
        assert other.loss == pytest.approx(one.loss, rel=1e-5)
        assert other.loss_squared_sum == pytest.approx(one.loss_squared_sum, rel=1e-4)
        assert other.download_bytes == one.download_bytes and other.finite == one.finite


def _assert_same_states(one: ClientOptimizerStates, other: ClientOptimizerStates,
                        parameters) -> None:
    """The same checkpoint: clients, optimizers, parameter positions, keys, types, values."""
    one, other = one.state_dict(parameters), other.state_dict(parameters)
    assert one.keys() == other.keys()
    for client, saved in one.items():
        for params, params_other in zip(saved, other[client], strict=True):
            assert params.keys() == params_other.keys()
            for position, state in params.items():
                assert state.keys() == params_other[position].keys()
                for key, value in state.items():
                    value_other = params_other[position][key]
                    assert type(value_other) is type(value)
                    if isinstance(value, tuple):  # ("rows", ids, values)
                        assert torch.equal(value_other[1], value[1])
                        value, value_other = value[2], value_other[2]
                    if torch.is_tensor(value):
                        assert value_other.dtype == value.dtype
                        torch.testing.assert_close(value_other, value, rtol=1e-5, atol=1e-6)
                    else:
                        assert value_other == value


def _compare(data, optimizers, schedule, embedding_l2, proximal_mu, local, float64=False,
             elementwise=True) -> None:
    """Both trainers on the same clients and module: the same updates and local rows, and
    the module left as it was."""
    clients = _clients(data)
    module = _module(data, embedding_l2, optimizers)
    if float64:
        data = _dense_in_float64(data, module)
    assert vectorization_blockers(module, False) == []
    before = {k: v.clone() for k, v in module.state_dict().items()}
    sequential, kept = _updates(CohortTrainer, data, module, schedule, clients, SEEDS,
                                proximal_mu, local)
    together, kept_together = _updates(VectorizedTrainer, data, module, schedule, clients,
                                       SEEDS, proximal_mu, local)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    for name in local:
        for client in clients:
            _assert_close(kept_together.rows[name][client].values,
                          kept.rows[name][client].values, elementwise)
    _assert_same_updates(sequential, together, elementwise)


@pytest.mark.parametrize("optimizers", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize(SCENARIO, SCENARIOS.values(), ids=SCENARIOS.keys())
def test_vectorized_updates_equal_the_sequential_ones(synthetic_data, schedule, embedding_l2,
                                                      proximal_mu, local, optimizers):
    """Clients of very different sizes, the embedding L2 term, FedProx, a local table, losses
    and Oort's squared sample losses, with each family of local optimizers, in float32:
    elementwise for SGD, in norm for the adaptive ones (see `_dense_in_float64`)."""
    _compare(synthetic_data, optimizers, schedule, embedding_l2, proximal_mu, local,
             elementwise=optimizers in (SGD, MOMENTUM))


@pytest.mark.parametrize("optimizers", ADAPTIVE.values(), ids=ADAPTIVE.keys())
@pytest.mark.parametrize(SCENARIO, SCENARIOS.values(), ids=SCENARIOS.keys())
def test_adaptive_optimizers_agree_elementwise_without_float32_noise(
        synthetic_data, schedule, embedding_l2, proximal_mu, local, optimizers):
    _compare(synthetic_data, optimizers, schedule, embedding_l2, proximal_mu, local,
             float64=True)


KEPT = {"momentum-adagrad": MOMENTUM_ADAGRAD, **ADAPTIVE}


@pytest.mark.parametrize("optimizers", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize(SCENARIO, [SCENARIOS["epochs"], SCENARIOS["fedprox-local-table"]],
                         ids=["epochs", "fedprox-local-table"])
def test_kept_optimizer_states_are_the_sequential_ones(synthetic_data, schedule, embedding_l2,
                                                       proximal_mu, local, optimizers):
    """federated.keep_optimizer_state over two rounds: the second round starts from the state
    the first kept (moments, sums, step counts, momentum buffers), what is kept after it is
    the same checkpoint either way, and each trainer resumes the other's checkpoint."""
    clients = _clients(synthetic_data)
    module = _module(synthetic_data, embedding_l2, optimizers)
    data = _dense_in_float64(synthetic_data, module)
    assert vectorization_blockers(module, True) == []
    parameters = list(module.parameters())

    def checkpointed(states: ClientOptimizerStates) -> None:
        states.load_state_dict(states.state_dict(parameters), parameters)

    def run(trainer_type, between_rounds=None):
        states = ClientOptimizerStates()
        updates, _ = _updates(trainer_type, data, module, schedule, clients, SEEDS,
                              proximal_mu, local, states, between_rounds)
        return updates, states

    sequential, kept = run(CohortTrainer)
    fresh, _ = _updates(CohortTrainer, data, module, schedule, clients, SEEDS, proximal_mu,
                        local)
    assert not torch.equal(sequential[0].dense, fresh[0].dense)  # the kept state counts
    for trainer_type in (VectorizedTrainer, (CohortTrainer, VectorizedTrainer),
                         (VectorizedTrainer, CohortTrainer)):
        updates, states = run(trainer_type, checkpointed)
        _assert_same_updates(sequential, updates)
        _assert_same_states(kept, states, parameters)


def test_what_does_not_vectorize_is_named(synthetic_data):
    module = _module(synthetic_data)
    assert vectorization_blockers(module, True) == []  # plain SGD keeps no state
    module.dense_optimizer = lambda p: optim.RMSprop(p, lr=0.01)
    assert vectorization_blockers(module, True) == [
        "optimizer: RMSprop is not vectorized (SGD, Adam, AdamW, Adagrad and SparseAdam are)"]
    with pytest.raises(ConfigError, match="federated.vectorize true: optimizer: RMSprop"):
        trainer_for(module, FederatedConfig(vectorize=True))
    assert trainer_for(module, FederatedConfig(vectorize="auto")) is CohortTrainer
    assert trainer_for(_module(synthetic_data),
                       FederatedConfig(vectorize="auto")).func is VectorizedTrainer
    assert trainer_for(_module(synthetic_data), FederatedConfig()).func is VectorizedTrainer
    assert trainer_for(_module(synthetic_data),
                       FederatedConfig(vectorize=False)) is CohortTrainer
    groups = _module(synthetic_data, optimizers=(
        lambda p: optim.SGD([{"params": p[:1], "lr": 0.1}, {"params": p[1:]}], lr=0.2), SGD[1]))
    assert vectorization_blockers(groups, False) == [
        "optimizer: several optimizers or settings for the dense parameters"]
    sparse_adam = _module(synthetic_data, optimizers=(lambda p: optim.SparseAdam(p), SGD[1]))
    assert vectorization_blockers(sparse_adam, False) == [
        "optimizer: SparseAdam on the dense parameters (it takes sparse gradients only)"]


REFUSED = {  # what torch refuses with the tables' sparse gradients, and the blocker's start
    "adam-tables": ((SGD[0], lambda p: optim.Adam(p)), False, "Adam/AdamW on the tables"),
    "sgd-weight-decay-tables": ((SGD[0], lambda p: optim.SGD(p, lr=0.1, weight_decay=0.1)), False,
                                "SGD's weight decay on the tables"),
    "adagrad-weight-decay-tables": ((SGD[0], lambda p: optim.Adagrad(p, weight_decay=0.1)), False,
                                    "Adagrad's weight decay on the tables"),
    "kept-sgd-momentum-tables": (MOMENTUM, True, "SGD momentum on the tables with federated"),
}


@pytest.mark.parametrize("optimizers, keep, blocker", REFUSED.values(), ids=REFUSED.keys())
def test_what_torch_refuses_on_sparse_gradients_is_refused_sequentially_too(
        synthetic_data, optimizers, keep, blocker):
    """These block vectorizing because the sequential trainer fails on them as well."""
    module = _module(synthetic_data, optimizers=optimizers)
    (found,) = vectorization_blockers(module, keep)
    assert found.startswith(f"optimizer: {blocker}")
    with pytest.raises((RuntimeError, NotImplementedError)):
        _updates(CohortTrainer, synthetic_data, module, LocalSchedule(batch_size=4), [3], [1],
                 optimizer_states=ClientOptimizerStates() if keep else None)


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


def test_optimizer_settings_are_read_per_kind_of_parameter(synthetic_data):
    module = _module(synthetic_data, optimizers=ADAM_ADAGRAD)
    tables = {name: part.weight for name, part in
              split_parameters(module, synthetic_data.features.sparse).tables.items()}
    storage = {name: weight.data_ptr() for name, weight in tables.items()}
    rules = optimizer_rules(module)
    assert (type(rules.dense).__name__, rules.dense.lr, rules.dense.weight_decay) == (
        "AdamRule", 0.01, 0.01)
    assert (type(rules.tables).__name__, rules.tables.lr, rules.tables.lr_decay,
            rules.tables.initial) == ("AdagradRule", 0.1, 0.05, 0.1)
    # read from optimizers built over emptied tables, which are given back
    assert {name: weight.data_ptr() for name, weight in tables.items()} == storage
    one = _module(synthetic_data)
    one.configure_optimizers = lambda: optim.SGD(one.parameters(), lr=0.5, momentum=0.9)
    rules = optimizer_rules(one)  # one optimizer for both kinds
    assert rules.dense == rules.tables and rules.dense.momentum == 0.9
    assert rules.optimizers == 1 and len(rules.placements) == len(list(one.parameters()))


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
    """Per step, its buckets: (their positions, their rows, their real rows per client)."""
    return [[((b.clients.start, b.clients.stop), b.rows.tolist(), b.mask.sum(1).tolist())
             for b in buckets] for buckets in plan.steps]


def test_a_step_plan_puts_the_longest_clients_first_and_pads_by_bucket():
    plan = _plan_of(chunk_clients=4, min_saved=10**6)
    assert plan.order.tolist() == [2, 0, 1, 3] and plan.position.tolist() == [1, 2, 0, 3]
    assert plan.step_counts.tolist() == [3, 2, 1, 1]
    assert _described(plan) == [
        [((0, 4), [[8, 9, 10, 11], [0, 1, 2, 3], [5, 6, 7, 0], [18, 0, 0, 0]], [4, 4, 3, 1])],
        [((0, 2), [[12, 13, 14, 15], [4, 0, 0, 0]], [4, 1])],
        [((0, 1), [[16, 17]], [2])]]
    # padding the last client to 4 wastes 3 rows: worth a bucket of its own at min_saved 3
    split = _described(_plan_of(chunk_clients=4, min_saved=3))[0]
    assert split == [((0, 3), [[8, 9, 10, 11], [0, 1, 2, 3], [5, 6, 7, 0]], [4, 4, 3]),
                     ((3, 4), [[18]], [1])]
    chunked = _described(_plan_of(chunk_clients=2, min_saved=10**6))
    assert [[clients for clients, _, _ in buckets] for buckets in chunked] == [
        [(0, 2)], [(0, 2)], [(0, 1)], [(2, 4)]]
    assert chunked[3] == [((2, 4), [[5, 6, 7], [18, 0, 0]], [3, 1])]


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


@pytest.mark.parametrize("vectorize, optimizers, local", [
    (True, SGD, []), (False, SGD, []), (True, ADAM_ADAGRAD, []), (True, SGD, ["user"]),
    (False, SGD, ["user"])],
    ids=["vectorized", "sequential", "vectorized-adam-adagrad-kept", "vectorized-local-table",
         "sequential-local-table"])
def test_training_and_aggregation_make_their_tensors_on_the_module_device(
        synthetic_data, monkeypatch, vectorize, optimizers, local):
    """No GPU here, so: with torch's default device set to `meta`, a tensor that local
    training or aggregation makes without naming a device lands on meta, and its first use
    beside the module's tensors fails. The round must run and train exactly as it does with
    the default device (`federated.device cuda` relies on this; the cohort is planned on the
    host and moved once)."""
    import fltoolkit.loop as loop_module
    from tests.test_federated import _loop

    def on_meta(step):
        def run(*args, **kwargs):
            with torch.device("meta"):
                return step(*args, **kwargs)
        return run

    settings = {"rounds": 2, "vectorize": vectorize, "proximal_mu": 0.1,
                "reject_norm_ratio": 3.0, "optimizers": optimizers,
                "keep_optimizer_state": optimizers is ADAM_ADAGRAD, "local_tables": local}
    plain = _loop(synthetic_data, **settings)
    loop = _loop(synthetic_data, **settings)
    loop.trainer.train_round = on_meta(loop.trainer.train_round)
    monkeypatch.setattr(loop_module, "aggregate_or_roll_back",
                        on_meta(loop_module.aggregate_or_roll_back))
    for round_index in (1, 2):  # the second starts from the state the first kept
        plain.run_round(round_index)
        loop.run_round(round_index)
    expected = plain.module.state_dict()
    for name, value in loop.module.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, expected[name]), name


def test_the_device_is_checked_where_it_is_named():
    with pytest.raises(ValueError, match="federated.device: 'gpu' is not a torch device"):
        FederatedConfig(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="federated.device cuda: CUDA is not available"):
            FederatedConfig(device="cuda")
    with pytest.raises(ValueError, match="sharded tables run on cpu only"):
        FederatedConfig(device="meta", sharding="table_wise")
