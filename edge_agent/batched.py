"""Many devices' local rounds at once, for a simulated fleet (PyTorch; runs
where ``training`` runs, never in an agent's network process).

A simulated fleet trains every device alone in ``train_round``: for the
MNIST 2NN with 60 examples a device (6 steps of 10), 2.3 ms of CPU a device
with one torch thread on a 2-core AMD EPYC, far more with two threads on a
busy machine. A step multiplies a 10 x 784 batch by a 784 x 200 weight: too
little work to amortise autograd, the optimizer and the Python around them.
Devices that start from the same global model can train together: their
parameters are stacked (``k`` copies of each tensor) and each step is one
batched matrix product for all of them: 1.0 ms of CPU a device on the same
machine and thread. ``train_many`` gives each device the update
``train_round`` would give it alone, from the same global model, data, plan
and seed:

* the same shuffling: each device's own ``torch.Generator`` seeded with its
  seed draws ``torch.randperm`` once an epoch, as ``torchkit.batches`` does;
* the same batches: a device's last batch of an epoch is smaller. Devices of
  different sizes take different numbers of steps and batch sizes; a step
  pads every device's batch to the largest at that step and masks it (a
  padded example contributes nothing, each device's mean divides by its own
  batch's real size);
* the same SGD as ``torch.optim.SGD``: lr, momentum (dampening 0, no
  Nesterov), weight_decay added to the gradient, FedProx's ``mu (w - w_g)``
  in the gradient, ``max_steps``;
* the same reported ``num_samples``, ``steps`` and mean loss.

Devices are sorted by their number of steps, so at every step the devices
still training are a prefix of the group and those done simply drop out of
the products (their parameters are not touched). The sums inside the
batched products are ordered differently from one device's, so the deltas
agree to float32 rounding, not bit for bit (tests/unit/test_batched.py
states the tolerance).

Engines:

* ``mlp``: ``nn.Sequential`` of ``Linear``, ``ReLU``, ``Identity`` (and a
  leading ``Flatten``): the built-in MLPs. Forward, backward and the SGD
  update written as batched products (``torch.baddbmm``), the weight's
  gradient folded into its update so it is never stored; the fastest.
* ``vmap``: any other model ``torch.func`` can map over:
  ``functional_call`` + ``grad`` + ``vmap``. It must treat the examples of a
  batch independently (padding), which is why BatchNorm is refused.
* ``loop``: ``train_round`` device by device. Used for Adam, models with
  buffers (BatchNorm), dropout or other randomness, data that is a
  ``Dataset``, inputs that are not float32, and whatever the batched
  engines refuse; it is ``train_round``, so its results are the reference.

``engine="auto"`` picks the first that applies and says why
(``choose_engine``); an explicit ``mlp`` or ``vmap`` raises ``Unbatchable``
rather than fall back.

Group size: a group's stacked state is read and written at every step, so
it trains fastest while that state stays in the CPU's cache. Measured on a
2-core AMD EPYC (32 MB L3 shared with the rest of the machine), one torch
thread, the 2NN with 60 examples a device: 1.0 ms of CPU a device in groups
of 8-10, 1.8 ms in groups of 256 (each group's 200 MB of weights then
streams from memory every step; bench/batched_training.py); a small model (digits_mlp) wants groups of 64-256,
where the per-step Python and dispatch overhead is shared by more devices.
``auto_group_size`` sizes a group so that its parameters (and momentum
buffers, and the vmap engine's gradients) fill ``CACHE_BUDGET``. Memory is
bounded by the group: ``bytes_per_device`` estimates a device's share.

The deltas a group returns are views of that group's stacked parameters (one
buffer per group, not a copy per device): iterate with ``iter_train_many``
and drop (or copy) each delta to bound memory in a large fleet.

Threads: the products of a small group are too small to split well between
threads; on a busy 2-core machine two torch threads cost several times the
CPU of one (threads spinning at each barrier). Run one torch thread per
process and a process per core, each training part of the fleet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.training import LocalResult, TrainingDiverged, train_round
from fedge.messages import TrainingPlan
from fedge.tensors import ModelArrays
from fedge.torchkit import Data, federated_arrays, load_federated

log = logging.getLogger("fedge.agent.batched")

Engine = Literal["auto", "mlp", "vmap", "loop"]
# One device's outcome: its delta (local - global, float32, federated tensors
# in state_dict order) and result, or the exception train_round would raise.
Outcome = tuple[ModelArrays, LocalResult] | Exception

# A group's stacked parameter state should fit this much cache (see the module
# docstring for the measurement); groups hold MIN_GROUP..MAX_GROUP devices.
CACHE_BUDGET = 8 << 20
MIN_GROUP, MAX_GROUP = 4, 256
_LOSSES = ("cross_entropy", "bce", "mse")


class Unbatchable(ValueError):
    """An explicitly requested batched engine cannot give this model, plan or
    data the update ``train_round`` would."""


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # "mlp", "vmap" or "loop"
    reason: str  # why not a faster engine ("" for mlp)


# --- public API ---------------------------------------------------------------------


def train_many(model: nn.Module, global_arrays: Mapping[str, np.ndarray], datasets: Sequence[Data],
               plan: TrainingPlan, seeds: Sequence[int], *, group_size: int | None = None,
               engine: Engine = "auto") -> list[Outcome]:
    """Train every device one round from ``global_arrays``; outcome ``i`` is
    device ``i``'s (``datasets[i]``, ``seeds[i]``), what ``train_round`` on a
    fresh copy of the global model would give (``(delta, LocalResult)``), or
    the exception it would raise (``TrainingDiverged``, ``ValueError``...).

    ``model`` is a model built by the job's factory; only its structure is
    used, its values are overwritten. All outcomes are held at once (a
    10,000-device fleet of the 2NN holds 8 GB of deltas): prefer
    ``iter_train_many`` for large fleets."""
    out: list[Outcome | None] = [None] * len(datasets)
    for i, outcome in iter_train_many(model, global_arrays, datasets, plan, seeds, group_size=group_size,
                                      engine=engine):
        out[i] = outcome
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def iter_train_many(model: nn.Module, global_arrays: Mapping[str, np.ndarray], datasets: Sequence[Data],
                    plan: TrainingPlan, seeds: Sequence[int], *, group_size: int | None = None,
                    engine: Engine = "auto") -> Iterator[tuple[int, Outcome]]:
    """``train_many`` as a stream: ``(i, outcome)`` for each device as its group
    finishes, in no particular order (groups run longest-training first).
    A group's deltas share one buffer, freed when the last of them is."""
    if len(datasets) != len(seeds):
        raise ValueError(f"{len(datasets)} data sets but {len(seeds)} seeds")
    if group_size is not None and group_size < 1:
        raise ValueError("group_size must be at least 1")
    load_federated(model, global_arrays)  # checks names and shapes once for the fleet
    choice = choose_engine(model, plan)
    if engine == "loop":
        choice = EngineChoice("loop", "asked for")
    elif engine != "auto":
        if choice.engine == "loop" or (engine == "mlp" and choice.engine != "mlp"):
            raise Unbatchable(f"the {engine} engine cannot train this model and plan: {choice.reason}")
        choice = EngineChoice(engine, "asked for")

    loop: list[int] = []
    kinds: dict[tuple[Any, ...], list[_Device]] = {}
    for i, (data, seed) in enumerate(zip(datasets, seeds, strict=True)):
        why = _data_unbatchable(data) if choice.engine != "loop" else "loop engine"
        if why == _EMPTY:
            loop.append(i)  # train_round's ValueError, whatever the engine
        elif why:
            if engine in ("mlp", "vmap"):
                raise Unbatchable(f"device {i}'s data cannot be batched: {why}")
            if choice.engine != "loop":
                log.info("device %d trains one by one: its data is %s", i, why)
            loop.append(i)
        else:
            assert isinstance(data, tuple)
            x, y = data
            dev = _Device(i, x, y, len(x), int(seed), local_steps(len(x), plan))
            kinds.setdefault((tuple(x.shape[1:]), tuple(y.shape[1:]), y.dtype), []).append(dev)
    if choice.engine == "loop" and datasets:
        log.info("%d devices train one by one: %s", len(datasets), choice.reason)

    failed = 0
    for devices in kinds.values():
        kind_engine = choice.engine
        if kind_engine == "mlp":
            why = _mlp_data_unfit(model, plan, devices[0].x, devices[0].y)
            if why:
                if engine == "mlp":
                    raise Unbatchable(f"the mlp engine cannot train on this data: {why}")
                kind_engine = "vmap"
        devices.sort(key=lambda d: -d.steps)  # stable: equal steps keep the callers' order
        size = group_size or auto_group_size(model, plan, kind_engine)
        for start in range(0, len(devices), size):
            group = devices[start : start + size]
            try:
                outcomes = _run_group(kind_engine, model, plan, group)
            except Exception as exc:
                if engine != "auto" and isinstance(exc, _Fallback):
                    raise Unbatchable(str(exc)) from None
                if engine != "auto":
                    raise
                # One device's bad labels fail its whole group; one by one, only that device fails.
                (log.debug if failed else log.warning)(
                    "the %s engine failed on a group of %d devices (%s: %s); it trains one by one",
                    kind_engine, len(group), type(exc).__name__, exc)
                failed += 1
                loop.extend(d.index for d in group)
            else:
                yield from outcomes
    if failed > 1:
        log.warning("%d groups trained one by one", failed)
    yield from _loop(model, global_arrays, datasets, plan, seeds, sorted(loop))


def choose_engine(model: nn.Module, plan: TrainingPlan) -> EngineChoice:
    """The fastest engine that gives this model and plan ``train_round``'s
    update, and why not a faster one (data may still send some devices, or a
    group, to a slower engine)."""
    if plan.optimizer != "sgd":
        return EngineChoice("loop", f"optimizer {plan.optimizer!r}: only SGD is batched (Adam trains one by one)")
    if plan.loss not in _LOSSES:
        return EngineChoice("loop", f"loss {plan.loss!r} is not one of {', '.join(_LOSSES)}")
    if plan.batch_size < 1:
        return EngineChoice("loop", f"batch size {plan.batch_size}")
    if any(True for _ in model.buffers()):
        return EngineChoice("loop", "the model has buffers (BatchNorm statistics?) that training updates")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return EngineChoice("loop", f"{name or 'the model'} is dropout (random per device)")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return EngineChoice("loop", f"{name or 'the model'} is BatchNorm (mixes a batch's examples)")
    params = dict(model.named_parameters())
    floats = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    if sorted(floats) != sorted(params):
        return EngineChoice("loop", "parameters shared between layers or not federated")
    layers = _mlp_layers(model)
    if isinstance(layers, str):
        return EngineChoice("vmap", layers)
    return EngineChoice("mlp", "")


def local_steps(n: int, plan: TrainingPlan) -> int:
    """How many optimizer steps ``train_round`` takes on ``n`` examples: every
    batch of every epoch, up to ``max_steps`` (which, when set, stops it after
    the step that reaches it; it never stops before the first)."""
    if n <= 0 or plan.batch_size < 1:
        return 0
    total = max(plan.epochs, 0) * -(-n // plan.batch_size)
    if plan.max_steps and total:
        total = min(total, max(plan.max_steps, 1))
    return total


def auto_group_size(model: nn.Module, plan: TrainingPlan, engine: str = "mlp") -> int:
    """Devices a group: as many as keep the group's stacked state (parameters,
    momentum buffers, the vmap engine's gradients) within ``CACHE_BUDGET``,
    between ``MIN_GROUP`` and ``MAX_GROUP``. The 2NN: 10 (5 with momentum);
    digits_mlp: 256."""
    state = _state_bytes(model, plan, engine)
    return max(MIN_GROUP, min(MAX_GROUP, CACHE_BUDGET // max(state, 1)))


def _state_bytes(model: nn.Module, plan: TrainingPlan, engine: str) -> int:
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return params * (1 + (plan.momentum != 0) + (engine == "vmap"))


def bytes_per_device(model: nn.Module, plan: TrainingPlan, examples: int, example_bytes: int,
                     engine: str = "mlp") -> int:
    """Estimated memory one device of a group holds while the group trains:
    its stacked parameters (which become its delta), a momentum buffer when
    momentum is on, the vmap engine's stored gradient, a copy of its data and
    one batch's activations. Times the group size, a group's memory."""
    widths = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    activations = 4 * max(plan.batch_size, 1) * (3 * widths + example_bytes // 4)
    schedule = 9 * local_steps(examples, plan) * max(plan.batch_size, 1)  # batch indices and mask
    return _state_bytes(model, plan, engine) + examples * example_bytes + activations + schedule


# --- devices, groups and their schedule ------------------------------------------------


@dataclass
class _Device:
    index: int
    x: torch.Tensor
    y: torch.Tensor
    n: int
    seed: int
    steps: int


class _Fallback(Exception):
    """A group the batched engines cannot train the way train_round would."""


_EMPTY = "empty"


def _data_unbatchable(data: Data) -> str:
    """Why a device's data cannot join a group ("" when it can)."""
    if not isinstance(data, tuple) or len(data) != 2:
        return f"a {type(data).__name__}, not an (x, y) pair"
    x, y = data
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return "not a pair of tensors"
    if len(x) == 0:
        return _EMPTY
    if len(x) != len(y):
        return f"{len(x)} inputs with {len(y)} labels"
    if x.dtype != torch.float32 or x.device.type != "cpu" or y.device.type != "cpu":
        return f"{x.dtype} inputs on {x.device}, not float32 on the CPU"
    return ""


def _schedule(group: Sequence[_Device], batch: int, offsets: Sequence[int], pad: int
              ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every device's batches, drawn as ``train_round`` draws them: one
    ``randperm`` from the device's own seeded generator per epoch it reaches,
    cut into ``batch``-sized pieces with a smaller last one. Returns the
    example indices into the group's concatenated data (``pad`` for padding)
    as (devices, steps, batch), the real batch sizes as (devices, steps), and
    how many devices are still training at each step."""
    k, most = len(group), group[0].steps if group else 0
    index = torch.full((k, most, batch), pad, dtype=torch.int64)
    for j, (dev, off) in enumerate(zip(group, offsets, strict=True)):
        if dev.steps == 0:
            continue
        per_epoch = -(-dev.n // batch)
        epochs = -(-dev.steps // per_epoch)
        gen = torch.Generator().manual_seed(dev.seed)
        rows = torch.full((epochs, per_epoch * batch), pad, dtype=torch.int64)
        for e in range(epochs):
            rows[e, : dev.n] = torch.randperm(dev.n, generator=gen) + off
        index[j, : dev.steps] = rows.view(epochs * per_epoch, batch)[: dev.steps]
    real = (index != pad).sum(dim=2)
    steps = torch.tensor([d.steps for d in group], dtype=torch.int64)
    active = [int((steps > t).sum()) for t in range(most)]
    return index, real, active


def _run_group(engine: str, model: nn.Module, plan: TrainingPlan, group: list[_Device]
               ) -> list[tuple[int, Outcome]]:
    """Train one group; every outcome is ready before any is returned, so that
    a group that fails (and then trains one by one) has reported nothing."""
    x_all = torch.cat([d.x for d in group] + [torch.zeros_like(group[0].x[:1])])
    y_all = torch.cat([d.y for d in group] + [torch.zeros_like(group[0].y[:1])])
    if plan.loss == "cross_entropy" and not y_all.is_floating_point() and bool((y_all < 0).any()):
        raise _Fallback("negative class labels (cross_entropy's ignore_index) are averaged differently")
    offsets = np.cumsum([0] + [d.n for d in group[:-1]]).tolist()
    index, real, active = _schedule(group, plan.batch_size, offsets, len(x_all) - 1)
    k, most = index.shape[0], index.shape[1]
    runner: _Stacked = _MlpEngine(model, plan, k) if engine == "mlp" else _VmapEngine(model, plan, k)
    losses = torch.zeros(k, most)
    masks = (index != len(x_all) - 1).to(torch.float32)
    counts = real.to(torch.float32)
    widths = real.amax(dim=0).tolist() if k and most else []  # devices done have 0: the max is the prefix's
    with torch.no_grad():
        for t in range(most):
            kt, width = active[t], widths[t]
            idx = index[:kt, t, :width]
            losses[:kt, t] = runner.step(kt, x_all[idx], y_all[idx], masks[:kt, t, :width], counts[:kt, t])
        deltas = runner.deltas()
    return list(_results(group, deltas, runner.names, losses, real))


def _results(group: list[_Device], deltas: dict[str, torch.Tensor], names: list[str], losses: torch.Tensor,
             real: torch.Tensor) -> Iterator[tuple[int, Outcome]]:
    """Each device's delta (views of the group's buffer) and result, or the
    TrainingDiverged train_round would have raised at its first non-finite
    loss."""
    finite = torch.isfinite(losses)
    weighted = (losses.double() * real.double()).sum(dim=1)
    seen = real.sum(dim=1)
    for j, dev in enumerate(group):
        ok = finite[j, : dev.steps]
        if not bool(ok.all()):
            step = int((~ok).nonzero()[0])
            value = float(losses[j, step])
            yield dev.index, TrainingDiverged(
                f"training loss became {value} at step {step}; lower the learning rate")
            continue
        delta = {name: deltas[name][j].numpy() for name in names}
        loss = float(weighted[j]) / max(int(seen[j]), 1)
        yield dev.index, (delta, LocalResult(num_samples=dev.n, loss=loss, steps=dev.steps))


def _loop(model: nn.Module, global_arrays: Mapping[str, np.ndarray], datasets: Sequence[Data],
          plan: TrainingPlan, seeds: Sequence[int], which: list[int]) -> Iterator[tuple[int, Outcome]]:
    """train_round device by device, as the worker runs it (every failure is
    that device's outcome)."""
    for i in which:
        try:
            load_federated(model, global_arrays)
            result = train_round(model, datasets[i], plan, int(seeds[i]))
            local = federated_arrays(model)
            delta = {k: (local[k] - np.asarray(global_arrays[k])).astype(np.float32) for k in local}
            yield i, (delta, result)
        except Exception as exc:
            yield i, exc
    if which:
        load_federated(model, global_arrays)


# --- the engines ---------------------------------------------------------------------------


class _Stacked:
    """``k`` devices' parameters stacked along a new first dimension (each
    starts as the global model), their momentum buffers, and SGD on them.
    A step trains the first ``kt`` devices (those with a step left)."""

    names: list[str]

    def __init__(self, model: nn.Module, plan: TrainingPlan, k: int) -> None:
        self.plan = plan
        self.k = k
        params = dict(model.named_parameters())
        self.names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        self.trained = [n for n in self.names if params[n].requires_grad]
        self.globals = {n: params[n].detach().clone() for n in self.names}
        self.stacked = {n: self.globals[n].expand(k, *self.globals[n].shape).clone() for n in self.trained}
        self.momentum = ({n: torch.zeros_like(self.stacked[n]) for n in self.trained} if plan.momentum else {})

    def step(self, kt: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor
             ) -> torch.Tensor:
        """One SGD step for devices ``:kt`` on their batches ``x``/``y`` (kt, b, ...)
        with ``mask`` (kt, b) marking real examples, ``counts`` (kt,) how many;
        returns each device's batch mean loss."""
        raise NotImplementedError

    def sgd(self, name: str, kt: int, grad: torch.Tensor) -> None:
        """torch.optim.SGD's update, in its order: FedProx's term joins the
        gradient (as autograd adds it in train_round), weight decay is added,
        momentum accumulates (its first step starts from a zero buffer, so
        ``0 * m + d`` is ``d`` exactly), the parameter moves by ``-lr``."""
        p = self.stacked[name][:kt]
        plan = self.plan
        if plan.prox_mu > 0:
            grad.add_(p - self.globals[name], alpha=plan.prox_mu)
        if plan.weight_decay:
            grad.add_(p, alpha=plan.weight_decay)
        if plan.momentum:
            grad = self.momentum[name][:kt].mul_(plan.momentum).add_(grad)
        p.add_(grad, alpha=-plan.lr)

    def sgd_product(self, name: str, kt: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """``sgd`` with the gradient ``a @ b`` (batched) folded into the update
        (``baddbmm_``), so that a weight's gradient is never stored: without
        momentum, ``p <- (1 - lr (wd + mu)) p - lr a @ b + lr mu w_g``; with
        it, the buffer takes the product. Algebraically torch.optim.SGD's
        step; rounded in a different order."""
        p = self.stacked[name][:kt]
        plan = self.plan
        decay = plan.weight_decay + plan.prox_mu
        if not plan.momentum:
            p.baddbmm_(a, b, beta=1.0 - plan.lr * decay, alpha=-plan.lr)
            if plan.prox_mu > 0:
                p.add_(self.globals[name], alpha=plan.lr * plan.prox_mu)
            return
        buf = self.momentum[name][:kt]
        buf.baddbmm_(a, b, beta=plan.momentum)
        if decay:
            buf.add_(p, alpha=decay)
        if plan.prox_mu > 0:
            buf.add_(self.globals[name], alpha=-plan.prox_mu)
        p.add_(buf, alpha=-plan.lr)

    def deltas(self) -> dict[str, torch.Tensor]:
        """local - global for every device, in place of the stacked parameters
        (frozen parameters: zeros)."""
        out = {}
        for n in self.names:
            if n in self.stacked:
                out[n] = self.stacked[n].sub_(self.globals[n])
            else:
                out[n] = torch.zeros(self.k, *self.globals[n].shape)
        return out


@dataclass(frozen=True)
class _Layer:
    weight: str
    bias: str | None
    relu: bool  # a ReLU follows


def _mlp_layers(model: nn.Module) -> list[_Layer] | str:
    """The model as Linear layers each optionally followed by a ReLU, or why
    it is not one (then the vmap engine trains it)."""
    if type(model) is not nn.Sequential:
        return f"{type(model).__name__} is not a plain nn.Sequential"
    layers: list[_Layer] = []
    seen: set[int] = set()
    for i, (name, module) in enumerate(model.named_children()):
        if id(module) in seen:
            return f"layer {name} appears twice"
        seen.add(id(module))
        if type(module) is nn.Linear:
            if not all(p.requires_grad for p in module.parameters()):
                return f"layer {name} is frozen"
            layers.append(_Layer(f"{name}.weight", f"{name}.bias" if module.bias is not None else None, False))
        elif type(module) is nn.ReLU:
            if not layers:
                return "a ReLU before the first Linear"
            layers[-1] = _Layer(layers[-1].weight, layers[-1].bias, True)
        elif type(module) is nn.Flatten:
            if i != 0 or module.start_dim != 1 or module.end_dim != -1:
                return "a Flatten other than nn.Flatten() first"
        elif type(module) is not nn.Identity:
            return f"layer {name} is {type(module).__name__}, not Linear, ReLU, Flatten or Identity"
    if not layers:
        return "no Linear layer"
    return layers


def _mlp_data_unfit(model: nn.Module, plan: TrainingPlan, x: torch.Tensor, y: torch.Tensor) -> str:
    """Why the mlp engine's own loss code cannot take these targets the way
    the plan's loss function would ("" when it can)."""
    children = list(model.children())
    flatten = bool(children) and type(children[0]) is nn.Flatten
    if x.dim() != 2 and not flatten:
        return f"inputs of shape {tuple(x.shape[1:])} (the engine takes vectors)"
    outputs = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    if plan.loss == "cross_entropy" and (y.dtype != torch.int64 or y.dim() != 1):
        return "cross_entropy with targets other than int64 class indices"
    if plan.loss == "bce" and y[:1].numel() != outputs:
        return f"bce with {y[:1].numel()} targets an example for {outputs} outputs"
    if plan.loss == "mse" and (y.dtype != torch.float32 or tuple(y.shape[1:]) != (outputs,)):
        return f"mse with {y.dtype} targets of shape {tuple(y.shape[1:])} for {outputs} outputs"
    return ""


class _MlpEngine(_Stacked):
    """Linear/ReLU stacks by hand: forward with ``baddbmm`` (bias + x W^T),
    the loss's gradient in closed form, backward layer by layer, each layer's
    weight updated as soon as the gradient below it is taken (the update
    needs the old weight no more)."""

    def __init__(self, model: nn.Module, plan: TrainingPlan, k: int) -> None:
        super().__init__(model, plan, k)
        layers = _mlp_layers(model)
        assert not isinstance(layers, str), layers
        self.layers = layers

    def step(self, kt: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor
             ) -> torch.Tensor:
        h = x.reshape(kt, x.shape[1], -1)
        inputs = []
        for layer in self.layers:
            inputs.append(h)
            w = self.stacked[layer.weight][:kt].transpose(1, 2)
            h = (torch.baddbmm(self.stacked[layer.bias][:kt].unsqueeze(1), h, w) if layer.bias
                 else torch.bmm(h, w))
            if layer.relu:
                h = h.clamp_min_(0)
        loss, grad = self._loss(h, y, mask, counts)
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            below = None
            if i > 0:  # the gradient at the layer's input, from its weight before the update
                below = torch.bmm(grad, self.stacked[layer.weight][:kt])
                if self.layers[i - 1].relu:
                    below.mul_(inputs[i] > 0)  # ReLU's backward: where its output is positive
            self.sgd_product(layer.weight, kt, grad.transpose(1, 2), inputs[i])
            if layer.bias:
                self.sgd(layer.bias, kt, grad.sum(dim=1))
            if below is not None:
                grad = below
        return loss

    def _loss(self, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each device's batch mean loss and the gradient of the sum of them
        with respect to the outputs (zero on padding)."""
        kt, b, c = out.shape
        loss_name = self.plan.loss
        if loss_name == "cross_entropy":
            logp = torch.log_softmax(out, dim=2)
            target = y.unsqueeze(2)
            per = -logp.gather(2, target).squeeze(2)
            grad = logp.exp_().scatter_add_(2, target, torch.full_like(target, -1, dtype=out.dtype))
            scale = mask / counts.unsqueeze(1)
        elif loss_name == "bce":
            t = y.reshape(kt, b, c).to(out.dtype)
            per = F.binary_cross_entropy_with_logits(out, t, reduction="none").sum(dim=2)
            grad = torch.sigmoid(out).sub_(t)
            scale = mask / (counts.unsqueeze(1) * c)
        else:
            grad = out - y
            per = (grad * grad).sum(dim=2)
            grad.mul_(2.0)
            scale = mask / (counts.unsqueeze(1) * c)
        loss = (per * mask).sum(dim=1) / (counts * (c if loss_name != "cross_entropy" else 1))
        return loss, grad.mul_(scale.unsqueeze(2))


class _VmapEngine(_Stacked):
    """Any model ``torch.func`` maps over: each device's loss through
    ``functional_call``, its gradient by ``grad``, all devices by ``vmap``.
    Randomness inside the model makes vmap raise (its default), which sends
    the group to the loop."""

    def __init__(self, model: nn.Module, plan: TrainingPlan, k: int) -> None:
        super().__init__(model, plan, k)
        frozen = {n: self.globals[n] for n in self.names if n not in self.stacked}
        per_example = _per_example_loss(plan.loss)

        def device_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                        count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = torch.func.functional_call(model, (params, frozen), (x,))
            per, elements = per_example(out, y)
            loss = (per * mask).sum() / (count * elements)
            return loss, loss.detach()

        self.fn = torch.func.vmap(torch.func.grad(device_loss, has_aux=True))

    def step(self, kt: int, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor
             ) -> torch.Tensor:
        params = {n: self.stacked[n][:kt] for n in self.trained}
        grads, loss = self.fn(params, x, y, mask, counts)
        for n in self.trained:
            self.sgd(n, kt, grads[n])
        return loss


def _per_example_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]:
    """For one device's batch: each example's summed loss and how many terms
    an example has, so that sum / (real examples x terms) is the plan's mean
    loss over the real examples. Targets the loss function would broadcast
    or convert are refused (the group then trains one by one)."""

    def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        per = F.cross_entropy(out, y, reduction="none")
        terms = per[0].numel() if per.dim() > 1 else 1
        return per.reshape(len(per), -1).sum(dim=1), terms

    def bce(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        z, t = out.reshape(len(out), -1), y.reshape(len(y), -1).to(out.dtype)
        if z.shape != t.shape:
            raise _Fallback(f"bce outputs {tuple(out.shape[1:])} against targets {tuple(y.shape[1:])}")
        return F.binary_cross_entropy_with_logits(z, t, reduction="none").sum(dim=1), z.shape[1]

    def mse(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        if out.shape != y.shape or y.dtype != out.dtype:
            raise _Fallback(f"mse outputs {tuple(out.shape)} against {y.dtype} targets {tuple(y.shape)}")
        d = (out - y).reshape(len(out), -1)
        return (d * d).sum(dim=1), d.shape[1]

    return {"cross_entropy": cross_entropy, "bce": bce, "mse": mse}[name]

