"""ClientTrainer: local training of one client on the shared global module, then restore.

No copy of the model per client: the trainer snapshots what the client can change (the flat
dense parameters and the table rows its batches touch, plus the optimizer state of those
rows), trains through the module's own `training_step` and `configure_optimizers`, reads off
the deltas and puts the snapshot back. A client's cost therefore follows its data, not the
size of the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.clients import ClientTable
from fltoolkit.model_parts import ModelParts
from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.updates import ClientUpdate, SparseRows


@dataclass(frozen=True)
class LocalSchedule:
    """How much a client trains per round.

    Attributes:
        batch_size: rows per local mini-batch (a client with fewer rows uses all of them).
        local_steps: mini-batches per round, cycling over the client's shuffled rows.
        local_epochs: if set, passes over the client's rows instead of `local_steps`.
    """

    batch_size: int = 32
    local_steps: int = 1
    local_epochs: int | None = None

    def batches(self, num_rows: int, generator: torch.Generator) -> list[Tensor]:
        """Row positions (within the client) of each local mini-batch."""
        if self.local_epochs:
            return [batch for _ in range(self.local_epochs)
                    for batch in torch.randperm(num_rows, generator=generator)
                    .split(self.batch_size)]
        size = min(self.batch_size, num_rows)
        needed = self.local_steps * size
        order = torch.randperm(num_rows, generator=generator)
        order = order.repeat(math.ceil(needed / num_rows))[:needed]
        return list(order.view(self.local_steps, size))


class ClientTrainer:
    """Trains clients one after another on `module`, leaving it unchanged after each.

    Args:
        module: the global LightningModule; its `training_step` gives the loss and its
            `configure_optimizers` the local optimizer (built once, state reset per client).
        parts: the module's dense parameters and tables (see `model_parts.split_parameters`).
        data: the training ClientTable.
        schedule: local batch size and steps.
        proximal_mu: FedProx coefficient; the gradient of mu/2 ||w - w_global||^2 is added.
        local_tables: store of client-local tables (their rows are never uploaded), or None.
    """

    def __init__(self, module: torch.nn.Module, parts: ModelParts, data: ClientTable,
                 schedule: LocalSchedule, proximal_mu: float = 0.0,
                 local_tables: LocalTableStore | None = None) -> None:
        self.module, self.parts, self.data, self.schedule = module, parts, data, schedule
        self.proximal_mu = proximal_mu
        self.local_tables = local_tables
        self.optimizers = _as_list(module.configure_optimizers())
        self.table_weights = {id(part.weight) for part in parts.tables.values()}
        self.dense_bytes = sum(p.numel() * p.element_size() for p in parts.dense)

    def train(self, client: int, seed: int) -> ClientUpdate:
        """Train one client from the current global weights; return its update."""
        rows = self.data.client_rows(client)
        num_rows = rows.stop - rows.start
        generator = torch.Generator().manual_seed(seed)
        batches = [rows.start + b for b in self.schedule.batches(num_rows, generator)]
        used_ids = self.data.sparse[torch.cat(batches)]
        touched = {name: torch.unique(used_ids[:, part.columns])
                   for name, part in self.parts.tables.items()}

        dense_before = parameters_to_vector(self.parts.dense).detach().clone()
        rows_before = {name: self.parts.tables[name].weight.detach()[ids]
                       for name, ids in touched.items()}
        optimizer_before = self._optimizer_snapshot(touched)
        with torch.no_grad():
            for name in self._local_names():
                start = self.local_tables.client_rows(name, client, touched[name])
                self.parts.tables[name].weight.index_copy_(0, touched[name], start)
            client_start = {name: self.parts.tables[name].weight.detach()[touched[name]]
                            for name in self._local_names()}

        self.module.train()
        losses = []
        for step, index in enumerate(batches):
            batch = self.data.rows(index)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss = self.module.training_step(batch, step)
            loss.backward()
            if self.proximal_mu:
                self._add_proximal_gradient(dense_before, {**rows_before, **client_start},
                                            touched)
            for optimizer in self.optimizers:
                optimizer.step()
            losses.append(float(loss.detach()))

        with torch.no_grad():
            dense_delta = parameters_to_vector(self.parts.dense).detach() - dense_before
            tables, download = {}, self.dense_bytes
            for name, ids in touched.items():
                weight = self.parts.tables[name].weight
                now = weight.detach()[ids]
                if self.local_tables is not None and name in self.local_tables:
                    self.local_tables.save(name, client, ids, now)
                else:
                    tables[name] = SparseRows(ids, now - rows_before[name])
                    download += tables[name].num_bytes()
                weight.index_copy_(0, ids, rows_before[name])
            vector_to_parameters(dense_before, self.parts.dense)
            self._optimizer_restore(optimizer_before, touched)
        return ClientUpdate(client=client, num_samples=num_rows,
                            loss=sum(losses) / len(losses), dense=dense_delta, tables=tables,
                            download_bytes=download)

    def _local_names(self) -> list[str]:
        if self.local_tables is None:
            return []
        return [name for name in self.parts.tables if name in self.local_tables]

    def _add_proximal_gradient(self, dense_before: Tensor, rows_before: dict[str, Tensor],
                               touched: dict[str, Tensor]) -> None:
        """grad += mu (w - w_start): the gradient of mu/2 ||w - w_start||^2, only where w moved.

        For tables this is a sparse gradient on the touched rows, added to the data gradient.
        """
        mu = self.proximal_mu
        offset = 0
        for param in self.parts.dense:
            start = dense_before[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
            pull = mu * (param.detach() - start)
            param.grad = pull if param.grad is None else param.grad + pull
        for name, ids in touched.items():
            weight = self.parts.tables[name].weight
            pull = mu * (weight.detach()[ids] - rows_before[name])
            sparse = torch.sparse_coo_tensor(ids[None], pull, weight.shape)
            weight.grad = sparse if weight.grad is None else weight.grad + sparse

    def _optimizer_snapshot(self, touched: dict[str, Tensor]) -> list[dict]:
        """The optimizer state the client may change: table rows it touches, all dense state.

        Parameters without state yet (lazily initialized optimizers like Adam) are recorded as
        absent and their state is dropped again on restore, so every client starts fresh.
        """
        ids_of = {id(part.weight): touched[name] for name, part in self.parts.tables.items()}
        snapshots = []
        for optimizer in self.optimizers:
            saved = {}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    state = optimizer.state.get(param)
                    if not state:
                        saved[param] = None
                        continue
                    ids = ids_of.get(id(param))
                    saved[param] = {
                        key: (value[ids].clone() if ids is not None and _is_rowwise(value, param)
                              else value.clone() if torch.is_tensor(value) else value)
                        for key, value in state.items()}
            snapshots.append(saved)
        return snapshots

    def _optimizer_restore(self, snapshots: list[dict], touched: dict[str, Tensor]) -> None:
        ids_of = {id(part.weight): touched[name] for name, part in self.parts.tables.items()}
        for optimizer, saved in zip(self.optimizers, snapshots, strict=True):
            for param, state in saved.items():
                if state is None:
                    optimizer.state.pop(param, None)
                    continue
                live = optimizer.state[param]
                ids = ids_of.get(id(param))
                for key, value in state.items():
                    if ids is not None and _is_rowwise(live[key], param):
                        live[key].index_copy_(0, ids, value)
                    else:
                        live[key] = value


def _is_rowwise(value: object, param: Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape


def _as_list(optimizers: object) -> list[torch.optim.Optimizer]:
    """configure_optimizers may return one optimizer, a list, or Lightning's dict form."""
    if isinstance(optimizers, dict):
        optimizers = optimizers["optimizer"]
    if isinstance(optimizers, (list, tuple)):
        return [o["optimizer"] if isinstance(o, dict) else o for o in optimizers]
    inner = getattr(optimizers, "optimizers", None)
    return list(inner) if inner else [optimizers]
