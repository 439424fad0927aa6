"""One round of local training (PyTorch). Runs only inside the training
worker process, never in the agent's network process.

Plain minibatch SGD or Adam over E epochs, with FedProx's proximal term
(Li et al. 2020, "Federated Optimization in Heterogeneous Networks") when
``prox_mu > 0``: mu/2 * ||w - w_global||^2 keeps a client near the model it
started from on skewed data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedge.messages import TrainingPlan
from fedge.torchkit import Data, batches, loss_function, num_examples


class TrainingDiverged(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalResult:
    num_samples: int
    loss: float
    steps: int


def train_round(model: nn.Module, data: Data, plan: TrainingPlan, seed: int) -> LocalResult:
    n = num_examples(data)
    if n == 0:
        raise ValueError("the device has no training examples")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    crit = loss_function(plan.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if plan.prox_mu > 0 else None
    if plan.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay
        )
    elif plan.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=plan.lr, weight_decay=plan.weight_decay)
    else:
        raise ValueError(f"unknown client optimizer {plan.optimizer!r}; use sgd or adam")
    model.train()
    steps, seen, loss_sum = 0, 0, 0.0
    for _ in range(plan.epochs):
        for xb, yb in batches(data, plan.batch_size, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            loss = crit(model(xb), yb)
            total = loss
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=False))
                total = loss + 0.5 * plan.prox_mu * prox
            total.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"training loss became {value} at step {steps}; lower the learning rate")
            loss_sum += value * len(yb)
            seen += len(yb)
            steps += 1
            if plan.max_steps and steps >= plan.max_steps:
                break
        if plan.max_steps and steps >= plan.max_steps:
            break
    return LocalResult(num_samples=n, loss=loss_sum / max(seen, 1), steps=steps)
