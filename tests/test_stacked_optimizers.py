"""Stacked per-client optimizers step like torch.optim run client by client: dense weights
stacked [C, ...], and compact table buffers whose rows belong to one client each, fed the
sparse gradients torch would get; a client that does not step keeps weights and state."""

from __future__ import annotations

import pytest
import torch

from fltoolkit.training.stacked_optimizers import RULES, StackedState, local_rules

DENSE = {
    "sgd-momentum-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                          nesterov=True, weight_decay=0.1),
    "sgd-dampening-maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5,
                                                        dampening=0.3, maximize=True),
    "sgd-weight-decay": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "adam-amsgrad-maximize": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True,
                                                        maximize=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.1, weight_decay=0.1,
                                             initial_accumulator_value=0.2),
}
TABLES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.1,
                                             initial_accumulator_value=0.2),
    "sparse-adam": lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.9)),
}
# the stepping clients of each step: client 1 sits out steps 2 and 4, client 2 stops after 3
ACTIVE = [[0, 1, 2], [0, 2], [0, 1, 2], [0], [0, 1]]


def _rule(factory):
    optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    return RULES[type(optimizer)].from_group(optimizer.param_groups[0])


def _dense(state: dict, key: str) -> torch.Tensor:
    value = state[key]
    return value.to_dense() if value.is_sparse else value


def _assert_state(stacked_value: torch.Tensor, torch_state: dict, key: str) -> None:
    torch.testing.assert_close(stacked_value, _dense(torch_state, key), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("factory", DENSE.values(), ids=DENSE.keys())
def test_stacked_dense_weights_step_like_torch_per_client(factory):
    torch.manual_seed(0)
    shapes = {"weight": (4, 3), "bias": (3,)}
    clients = 3
    stacked = {name: torch.randn(clients, *shape) for name, shape in shapes.items()}
    params = [{name: torch.nn.Parameter(stacked[name][c].clone()) for name in shapes}
              for c in range(clients)]
    optimizers = [factory(list(p.values())) for p in params]
    state = StackedState(_rule(factory), stacked, {n: torch.arange(clients) for n in shapes},
                         clients)
    for active in ACTIVE:
        before = {name: value.clone() for name, value in stacked.items()}
        before_state = {name: {k: v.clone() for k, v in s.items()}
                        for name, s in state.state.items()}
        gradients = {name: torch.randn(len(active), *shape) for name, shape in shapes.items()}
        for position, client in enumerate(active):
            for name, param in params[client].items():
                param.grad = gradients[name][position].clone()
            optimizers[client].step()
        index = torch.tensor(active)
        state.step(index, stacked, {name: [(index, grad)] for name, grad in gradients.items()},
                   coalesced=True)
        for client in range(clients):
            for name, param in params[client].items():
                if client not in active:  # frozen: bit-identical weights and state
                    assert torch.equal(stacked[name][client], before[name][client])
                    for key, value in state.state[name].items():
                        assert torch.equal(value[client], before_state[name][key][client])
                torch.testing.assert_close(stacked[name][client], param.detach(), rtol=1e-5,
                                           atol=1e-7)
                torch_state = optimizers[client].state[param]
                for key, value in state.state[name].items():
                    _assert_state(value[client], torch_state, key)
                if "step" in torch_state:
                    assert float(state.steps[client]) == float(torch_state["step"])


@pytest.mark.parametrize("fedprox", [False, True], ids=["data", "data+fedprox"])
@pytest.mark.parametrize("factory", TABLES.values(), ids=TABLES.keys())
def test_stacked_table_rows_step_like_torch_on_sparse_gradients(factory, fedprox):
    """Each client's torch optimizer gets its own copy of the buffer and a sparse gradient
    with repeated rows, zero-valued rows, and (FedProx) its whole segment as a second part."""
    torch.manual_seed(1)
    segments = [0, 5, 9, 16]  # client c owns rows segments[c]:segments[c + 1]
    clients, width = 3, 4
    buffer = torch.randn(segments[-1], width)
    owners = torch.repeat_interleave(torch.arange(clients), torch.tensor([5, 4, 7]))
    params = [torch.nn.Parameter(buffer.clone()) for _ in range(clients)]
    optimizers = [factory([p]) for p in params]
    state = StackedState(_rule(factory), {"t": buffer}, {"t": owners}, clients)
    for active in ACTIVE:
        before, before_state = buffer.clone(), {k: v.clone() for k, v in state.state["t"].items()}
        pieces = []
        for client in active:
            low, high = segments[client], segments[client + 1]
            ids = torch.randint(low, high, (6,))
            values = torch.randn(6, width)
            values[0] = 0.0  # a row in the gradient with a zero value
            parts = [(ids, values)]
            if fedprox:
                parts.append((torch.arange(low, high), 0.1 * torch.randn(high - low, width)))
            indices = torch.cat([i for i, _ in parts])[None]
            params[client].grad = torch.sparse_coo_tensor(
                indices, torch.cat([v for _, v in parts]), buffer.shape)
            optimizers[client].step()
            pieces += parts
        state.step(torch.tensor(active), {"t": buffer}, {"t": pieces})
        for client in range(clients):
            rows = slice(segments[client], segments[client + 1])
            if client not in active:
                assert torch.equal(buffer[rows], before[rows])
                for key, value in state.state["t"].items():
                    assert torch.equal(value[rows], before_state[key][rows])
            torch.testing.assert_close(buffer[rows], params[client].detach()[rows], rtol=1e-5,
                                       atol=1e-6)
            torch_state = optimizers[client].state[params[client]]
            for key, value in state.state["t"].items():
                _assert_state(value[rows], {key: _dense(torch_state, key)[rows]}, key)


def test_rules_are_one_per_kind_of_parameter_or_a_reason():
    dense = {"w": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(1))}
    tables = {"user": torch.nn.Parameter(torch.zeros(3, 2))}
    rules = local_rules([torch.optim.Adam(dense.values(), lr=0.1),
                         torch.optim.Adagrad(tables.values(), lr=0.2)], dense, tables)
    assert (rules.dense.lr, rules.tables.lr, rules.optimizers) == (0.1, 0.2, 2)
    assert [(p.optimizer, p.table, p.name) for p in rules.placements] == [
        (0, False, "w"), (0, False, "b"), (1, True, "user")]
    assert rules.blockers(keep_optimizer_state=True) == []
    groups = [{"params": [dense["w"]], "lr": 0.1}, {"params": [dense["b"]], "lr": 0.2}]
    assert local_rules([torch.optim.SGD(groups), torch.optim.SGD(tables.values(), lr=0.1)],
                       dense, tables) == "several optimizers or settings for the dense parameters"
    assert local_rules([torch.optim.SGD([dense["w"]], lr=0.1)], dense, tables) == \
        "every parameter needs exactly one optimizer"
    assert local_rules([torch.optim.RMSprop(dense.values()), torch.optim.SGD(
        tables.values(), lr=0.1)], dense, tables).startswith("RMSprop is not vectorized")
    adam_tables = local_rules([torch.optim.SGD([*dense.values(), *tables.values()], lr=0.1,
                                               momentum=0.9)], dense, tables)
    assert adam_tables.blockers(False) == []
    assert adam_tables.blockers(True)[0].startswith("SGD momentum on the tables")
    both_adam = local_rules([torch.optim.Adam([*dense.values(), *tables.values()])], dense,
                            tables)
    assert both_adam.blockers(False)[0].startswith("Adam/AdamW on the tables")
