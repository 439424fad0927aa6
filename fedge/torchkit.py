"""PyTorch-side helpers both roles use: building a model from its factory,
moving its federated tensors in and out as NumPy, loading data named by an
import path, batching, losses and evaluation.

Only the training worker, the aggregator and the export CLI import this
module; the agent's network process must not (an idle device keeps PyTorch
out of memory).

"Federated tensors" are the floating-point entries of ``state_dict()``
(parameters and float buffers such as BatchNorm statistics), in
``state_dict`` order. Integer buffers (``num_batches_tracked``) stay local.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.imports import ImportSpecError, load_callable
from fedge.tensors import ModelArrays

Data = tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset


def build_model(factory: str, args: Mapping[str, Any] | None = None, seed: int | None = None) -> nn.Module:
    fn = load_callable(factory, "model factory")
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = fn(**dict(args or {}))
    except TypeError as exc:
        raise ImportSpecError(f"model factory {factory!r} rejected its arguments {dict(args or {})}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ImportSpecError(
            f"model factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def federated_arrays(model: nn.Module) -> ModelArrays:
    return {
        name: t.detach().to("cpu", torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }


def load_federated(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    state = model.state_dict()
    wanted = [n for n, t in state.items() if t.is_floating_point()]
    missing = [n for n in wanted if n not in arrays]
    if missing:
        raise ValueError(f"model tensors missing from the global model: {missing[:3]}")
    with torch.no_grad():
        for name in wanted:
            src = np.asarray(arrays[name])
            dst = state[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, the model has {tuple(dst.shape)}")
            if dst.dtype == torch.float32 and dst.device.type == "cpu" and dst.is_contiguous():
                dst.numpy()[...] = src  # one copy, straight from the (read-only) wire buffer
            else:
                dst.copy_(torch.from_numpy(np.array(src, dtype=np.float32)))


def load_data(factory: str, args: Mapping[str, Any] | None = None) -> Data:
    fn = load_callable(factory, "data")
    try:
        out = fn(**dict(args or {}))
    except TypeError as exc:
        raise ImportSpecError(f"data {factory!r} rejected its arguments {dict(args or {})}: {exc}") from None
    if isinstance(out, torch.utils.data.Dataset):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in out)
        if len(x) != len(y):
            raise ValueError(f"data {factory!r} returned {len(x)} inputs but {len(y)} labels")
        if x.is_floating_point():
            x = x.float()
        return x, y
    raise ImportSpecError(f"data {factory!r} returned {type(out).__name__}; return (x, y) arrays or a torch Dataset")


def num_examples(data: Data) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)  # type: ignore[arg-type]


def batches(data: Data, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple):
        x, y = data
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
        yield from loader


def loss_function(name: str) -> nn.Module:
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "bce":
        return _BCE()
    if name == "mse":
        return nn.MSELoss()
    raise ValueError(f"unknown loss {name!r}; use cross_entropy, bce or mse")


class _BCE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(logits.reshape(-1), target.float().reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, loss: str = "cross_entropy", batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and (for classification) accuracy over ``data``."""
    model.eval()
    crit = loss_function(loss)
    total, loss_sum, correct = 0, 0.0, 0
    for xb, yb in batches(data, batch_size, shuffle=False):
        out = model(xb)
        n = len(yb)
        loss_sum += float(crit(out, yb)) * n
        if loss == "cross_entropy":
            correct += int((out.argmax(dim=1) == yb).sum())
        elif loss == "bce":
            correct += int(((out.reshape(-1) > 0).long() == yb.reshape(-1).long()).sum())
        total += n
    result = {"loss": loss_sum / max(total, 1), "examples": float(total)}
    if loss in ("cross_entropy", "bce"):
        result["accuracy"] = correct / max(total, 1)
    return result
