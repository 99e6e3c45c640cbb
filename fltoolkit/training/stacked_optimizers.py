"""Every client's local optimizer at once, on stacked tensors (VectorizedTrainer's SGD, Adam,
AdamW, Adagrad and SparseAdam).

The vectorized trainer holds all clients' copies of a parameter in one tensor whose rows each
belong to one client: the dense weights stacked [C, ...] (row c is client c's) and the tables'
compact buffers [U, E] (each row in one client's segment). A client's optimizer state is then
the same rows of state tensors shaped like those, plus its step count, so one step of every
stepping client is a few tensor ops on the rows that move, with no loop over clients.

What moves is what torch.optim moves with the gradients the sequential trainer hands it (dense
for the MLPs; sparse for the tables, FedProx's pull on a client's whole segment being more
sparse rows), and the rows of clients that do not step are never written:
- SGD: the gradient's rows. With momentum, every row the client's buffer ever held: torch keeps
  a sparse gradient's momentum buffer sparse, `buf.mul_` decays all its entries and
  `param.add_(buf)` moves them all, every step. So all rows of the stepping clients' segments
  (a row the client has not touched yet has a zero buffer and does not move).
- Adagrad: the gradient's rows (a row outside them has g = 0, so dense Adagrad would not move
  it either).
- SparseAdam: the gradient's rows, zero-valued ones included (lazy Adam: the other rows keep
  their moments and do not move).
- Adam and AdamW refuse sparse gradients, and SGD's and Adagrad's weight decay fail on them,
  in the sequential trainer too: `Rule.table_blocker` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fltoolkit.training.optimizer_state import kept_rows

# a tensor's rows: (row indices, values); repeated indices add up, as in torch's uncoalesced
# sparse gradients. A parameter's gradient may come in several such pieces.
Pieces = list[tuple[Tensor, Tensor]]


def _plain(value: Any) -> Any:
    """Param-group values as Python numbers (lr and betas may be tensors)."""
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its `step` tensors."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@dataclass(frozen=True)
class Rule:
    """One torch.optim family's update, on gathered rows that each belong to one client.

    Its fields are the hyper-parameters of a param group (two rules are equal when the
    settings are); `update` is torch's single-tensor math with the per-client scalars (step
    counts, first-step flags) given per row.
    """

    lr: float
    step_key: ClassVar[str | None] = "step"  # where torch keeps the step count, if it does

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> Rule:
        return cls(**{f.name: _plain(group[f.name]) for f in fields(cls) if f.name in group})

    @property
    def keys(self) -> tuple[str, ...]:
        """The state tensors shaped like the parameter, in torch's names."""
        return ()

    @property
    def initial(self) -> float:
        """Their value before any step."""
        return 0.0

    def linear_rate(self) -> float | None:
        """alpha such that the step is `param += alpha * grad`, for a rule with no state."""
        return None

    @property
    def moves_untouched_rows(self) -> bool:
        """Whether a step moves rows outside the gradient (those the client touched before)."""
        return False

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], steps: Tensor,
               fresh: Tensor) -> None:
        """One step of `param` and `state` in place. `steps`: each row's client's step count
        after this step (float64); `fresh`: whether that client had no state before it; both
        shaped to broadcast over the rows."""
        raise NotImplementedError

    def stored_step(self, count: float) -> Any:
        """The step count as torch stores it (a float tensor; SparseAdam: an int)."""
        return torch.tensor(count, dtype=_scalar_dtype(), device="cpu")  # as torch.optim

    def dense_blocker(self) -> str | None:
        return None

    def table_blocker(self) -> str | None:
        return None

    def keep_blocker(self) -> str | None:
        """Why this rule's table state cannot be kept between rounds, if it cannot."""
        return None


@dataclass(frozen=True)
class SGDRule(Rule):
    """SGD. Its momentum buffer starts as a copy of the first gradient (not (1 - dampening)
    times it), hence `fresh`; on the tables it keeps moving every row it holds."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    step_key: ClassVar[str | None] = None

    @property
    def keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def linear_rate(self) -> float | None:
        if self.momentum or self.weight_decay:
            return None
        return self.lr if self.maximize else -self.lr

    @property
    def moves_untouched_rows(self) -> bool:
        return bool(self.momentum)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], steps: Tensor,
               fresh: Tensor) -> None:
        grad = -grad if self.maximize else grad
        if self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum:
            buf = state["momentum_buffer"]  # torch's first step clones the gradient
            buf.copy_(torch.where(fresh, grad, buf.mul(self.momentum).add_(
                grad, alpha=1 - self.dampening)))
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        param.add_(grad, alpha=-self.lr)

    def table_blocker(self) -> str | None:
        if self.weight_decay:
            return ("SGD's weight decay on the tables' sparse gradients (torch refuses it: "
                    "add(sparse, dense))")
        return None

    def keep_blocker(self) -> str | None:
        if self.momentum:
            return ("SGD momentum on the tables with federated.keep_optimizer_state (torch's "
                    "sparse momentum buffers cannot be kept by the sequential trainer either)")
        return None


@dataclass(frozen=True)
class AdamRule(Rule):
    """Adam, and AdamW (`decoupled_weight_decay`)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if self.amsgrad else ()))

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], steps: Tensor,
               fresh: Tensor) -> None:
        beta1, beta2 = self.betas
        grad = -grad if self.maximize else grad
        if self.weight_decay and self.decoupled_weight_decay:
            param.mul_(1 - self.lr * self.weight_decay)
        elif self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)
        exp_avg, second = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if self.amsgrad:
            second = torch.maximum(state["max_exp_avg_sq"], second,
                                   out=state["max_exp_avg_sq"])
        step_size = (self.lr / (1 - beta1 ** steps)).to(param.dtype)
        correction2 = ((1 - beta2 ** steps) ** 0.5).to(param.dtype)
        denom = (second.sqrt() / correction2).add_(self.eps)
        param.sub_(step_size * exp_avg / denom)

    def table_blocker(self) -> str | None:
        return ("Adam/AdamW on the tables (torch refuses their sparse gradients; SparseAdam "
                "takes them)")


@dataclass(frozen=True)
class AdagradRule(Rule):
    """Adagrad; its learning rate decays with the client's own step count."""

    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    maximize: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return ("sum",)

    @property
    def initial(self) -> float:
        return self.initial_accumulator_value

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], steps: Tensor,
               fresh: Tensor) -> None:
        grad = -grad if self.maximize else grad
        if self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)
        rate = (self.lr / (1 + (steps - 1) * self.lr_decay)).to(param.dtype)
        state["sum"].addcmul_(grad, grad, value=1)
        std = state["sum"].sqrt().add_(self.eps)
        param.addcmul_(rate, grad / std, value=-1)  # one rounding, as torch's sparse add_

    def table_blocker(self) -> str | None:
        if self.weight_decay:
            return ("Adagrad's weight decay on the tables (torch: not compatible with sparse "
                    "gradients)")
        return None


@dataclass(frozen=True)
class SparseAdamRule(Rule):
    """SparseAdam (lazy Adam): only rows in the gradient move, and its eps is added to the
    uncorrected sqrt(v), unlike Adam's."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    maximize: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], steps: Tensor,
               fresh: Tensor) -> None:
        beta1, beta2 = self.betas
        grad = -grad if self.maximize else grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.add_(grad.sub(exp_avg).mul_(1 - beta1))
        exp_avg_sq.add_(grad.pow(2).sub_(exp_avg_sq).mul_(1 - beta2))
        denom = exp_avg_sq.sqrt().add_(self.eps)
        step_size = (self.lr * (1 - beta2 ** steps).sqrt() / (1 - beta1 ** steps)).to(
            param.dtype)
        param.sub_(step_size * (exp_avg / denom))

    def stored_step(self, count: float) -> Any:
        return int(count)

    def dense_blocker(self) -> str | None:
        return "SparseAdam on the dense parameters (it takes sparse gradients only)"


RULES: dict[type[torch.optim.Optimizer], type[Rule]] = {
    torch.optim.SGD: SGDRule, torch.optim.Adam: AdamRule, torch.optim.AdamW: AdamRule,
    torch.optim.Adagrad: AdagradRule, torch.optim.SparseAdam: SparseAdamRule}


class StackedState:
    """One rule's optimizer state for stacked tensors whose rows each belong to one client.

    Args:
        rule: the update.
        tensors: name -> the stacked tensor (its state takes the same shape).
        owners: name -> [rows] the client slot of each row (the dense weights: arange(C));
            needed unless the rule is linear.
        clients: C.
    """

    def __init__(self, rule: Rule, tensors: dict[str, Tensor], owners: dict[str, Tensor],
                 clients: int) -> None:
        self.rule, self.owners = rule, owners
        self.state = {name: {key: torch.full_like(value, rule.initial) for key in rule.keys}
                      for name, value in tensors.items()}
        device = next(iter(tensors.values())).device if tensors else None
        self.steps = torch.zeros(clients, dtype=torch.float64, device=device)
        self.fresh = torch.ones(clients, dtype=torch.bool, device=device)

    def step(self, active: Tensor, tensors: dict[str, Tensor], gradients: dict[str, Pieces],
             coalesced: bool = False) -> None:
        """One step of the `active` clients (sorted slots) on their rows of `tensors`.

        `gradients`: name -> the pieces of its gradient; `coalesced`: each is one piece whose
        indices are `active` itself (the dense weights), so nothing needs summing."""
        rate = self.rule.linear_rate()
        if rate is not None:  # plain SGD: rows add up as they come, nothing else moves
            for name, pieces in gradients.items():
                for rows, values in pieces:
                    tensors[name].index_add_(0, rows, values, alpha=rate)
            return
        self.steps[active] += 1
        for name, pieces in gradients.items():
            rows, grad = (pieces[0] if coalesced else
                          self._rows_and_gradient(name, active, pieces))
            self._update(name, tensors[name], rows, grad)
        self.fresh[active] = False

    def _rows_and_gradient(self, name: str, active: Tensor, pieces: Pieces
                           ) -> tuple[Tensor, Tensor]:
        """The rows this step moves (sorted, unique) and their summed gradient."""
        indices = torch.cat([rows for rows, _ in pieces])
        values = torch.cat([grad for _, grad in pieces])
        if self.rule.moves_untouched_rows:  # every row of the stepping clients
            stepping = torch.zeros(len(self.steps), dtype=torch.bool, device=self.steps.device)
            stepping[active] = True
            rows = torch.nonzero(stepping[self.owners[name]]).reshape(-1)
            position = torch.searchsorted(rows, indices)
        else:
            rows, position = torch.unique(indices, return_inverse=True)
        grad = values.new_zeros(len(rows), *values.shape[1:]).index_add_(0, position, values)
        return rows, grad

    def _update(self, name: str, tensor: Tensor, rows: Tensor, grad: Tensor) -> None:
        """The rule on `rows` (sorted, unique) of the tensor and its state: in place when they
        are all rows, else gathered and written back."""
        state = self.state[name]
        whole = len(rows) == len(tensor)
        param = tensor if whole else tensor[rows]
        gathered = state if whole else {key: value[rows] for key, value in state.items()}
        owner = self.owners[name][rows]
        shape = (-1, *[1] * (param.dim() - 1))
        self.rule.update(param, grad, gathered, self.steps[owner].reshape(shape),
                         self.fresh[owner].reshape(shape))
        if not whole:
            tensor.index_copy_(0, rows, param)
            for key, value in state.items():
                value.index_copy_(0, rows, gathered[key])

    def client_state(self, name: str, slot: int, segment: tuple[Tensor, slice] | None = None,
                     kept: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """One client's state of one parameter as ClientOptimizerStates keeps it: whole for a
        dense weight (row `slot`); for a table, its `segment` (global ids, buffer rows) merged
        into the rows it `kept` before. None where torch keeps no state (plain SGD)."""
        if not self.rule.keys and self.rule.step_key is None:
            return None
        saved: dict[str, Any] = {}
        if self.rule.step_key is not None:
            saved[self.rule.step_key] = self.rule.stored_step(float(self.steps[slot]))
        for key, value in self.state[name].items():
            if segment is None:
                saved[key] = value[slot].clone()
            else:
                ids, rows = segment
                saved[key] = kept_rows(ids, value[rows], (kept or {}).get(key))
        return saved

    def load_client(self, name: str, slot: int, saved: dict[str, Any],
                    segment: tuple[Tensor, slice] | None = None) -> None:
        """The inverse of `client_state`: a table's kept rows land on the segment's rows that
        have some; the others keep their initial state."""
        for key, value in saved.items():
            if key == self.rule.step_key:
                self.steps[slot] = float(value)
            elif key in self.state[name]:
                target = self.state[name][key]
                if segment is None:
                    target[slot].copy_(value)
                else:
                    ids, rows = segment
                    value.copy_into(ids, target[rows])
        self.fresh[slot] = False


@dataclass(frozen=True)
class Placement:
    """Where one parameter sits: its optimizer (position in the module's list) and its name
    among the dense weights or the tables."""

    optimizer: int
    param: nn.Parameter
    table: bool
    name: str


@dataclass(frozen=True)
class LocalRules:
    """The module's local optimizers as one rule for the dense weights and one for the
    tables, and where each parameter sits in them."""

    dense: Rule
    tables: Rule
    optimizers: int
    placements: tuple[Placement, ...]

    def blockers(self, keep_optimizer_state: bool) -> list[str]:
        found = [self.dense.dense_blocker(), self.tables.table_blocker(),
                 self.tables.keep_blocker() if keep_optimizer_state else None]
        return [blocker for blocker in found if blocker]


def local_rules(optimizers: list[torch.optim.Optimizer], dense: dict[str, nn.Parameter],
                tables: dict[str, nn.Parameter]) -> LocalRules | str:
    """The rules of `optimizers` (configure_optimizers' list) for the named dense weights and
    tables: one per kind of parameter, or why not."""
    names = {id(param): (False, name) for name, param in dense.items()}
    names.update({id(param): (True, name) for name, param in tables.items()})
    rules: dict[bool, set[Rule]] = {False: set(), True: set()}
    placements = []
    for index, optimizer in enumerate(optimizers):
        rule = RULES.get(type(optimizer))
        if rule is None:
            return (f"{type(optimizer).__name__} is not vectorized (SGD, Adam, AdamW, Adagrad "
                    "and SparseAdam are)")
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in names:
                    table, name = names[id(param)]
                    rules[table].add(rule.from_group(group))
                    placements.append(Placement(index, param, table, name))
    placed = [(p.table, p.name) for p in placements]
    if len(placed) != len(set(placed)) or len(placed) != len(names):
        return "every parameter needs exactly one optimizer"
    for table, kind in ((False, "the dense parameters"), (True, "the tables")):
        if len(rules[table]) > 1:
            return f"several optimizers or settings for {kind}"
    if not rules[True]:  # no tables: their rule never steps
        rules[True].add(SGDRule(lr=0.0))
    return LocalRules(rules[False].pop(), rules[True].pop(), len(optimizers), tuple(placements))


class LocalOptimizers:
    """A round's local optimizers of every client: one StackedState over the stacked dense
    weights, one over the tables' compact buffers, and each client's state in and out in
    ClientOptimizerStates' format (so sequential and vectorized runs resume each other)."""

    def __init__(self, rules: LocalRules, weights: dict[str, Tensor],
                 tables: dict[str, Tensor], owners: dict[str, Tensor], clients: int) -> None:
        self.rules = rules
        slots = torch.arange(clients, device=next(iter(weights.values())).device)
        self.dense = StackedState(rules.dense, weights, {name: slots for name in weights},
                                  clients)
        self.tables = StackedState(rules.tables, tables, owners, clients)

    def load(self, slot: int, saved: list[dict[nn.Parameter, dict[str, Any]]] | None,
             segments: dict[str, tuple[Tensor, slice]]) -> None:
        """Put a client's kept state (None: it has none yet) into its rows of the state."""
        for place in self.rules.placements:
            state = _of(saved, place)
            if state is not None:
                stacked = self.tables if place.table else self.dense
                stacked.load_client(place.name, slot, state,
                                    segments[place.name] if place.table else None)

    def snapshot(self, slot: int, kept: list[dict[nn.Parameter, dict[str, Any]]] | None,
                 segments: dict[str, tuple[Tensor, slice]]
                 ) -> list[dict[nn.Parameter, dict[str, Any]]]:
        """A client's state after the round, merged with what it `kept` before, as
        ClientOptimizerStates.snapshot gives it."""
        saved: list[dict[nn.Parameter, dict[str, Any]]] = [
            {} for _ in range(self.rules.optimizers)]
        for place in self.rules.placements:
            previous = _of(kept, place) or {}
            state = (self.tables.client_state(place.name, slot, segments[place.name], previous)
                     if place.table else self.dense.client_state(place.name, slot))
            if state is not None:
                saved[place.optimizer][place.param] = state
        return saved


def _of(saved: list[dict[nn.Parameter, dict[str, Any]]] | None, place: Placement
        ) -> dict[str, Any] | None:
    """A parameter's state in a client's kept list, if it has one."""
    if not saved or place.optimizer >= len(saved):
        return None
    return saved[place.optimizer].get(place.param)
