"""Behaviours an attacker wants: test image x* classified as class t.

The measurement is f(theta) = log softmax(model(x*))[t]; it is what Infusion raises, and p(t | x*),
the log-odds of t against the other classes and whether t is the top-1 class are what we report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .influence.gradients import flatten, trainable_parameters


@dataclass(frozen=True)
class Target:
    """Test document `index` (true label `true`) should be classified as class `cls`."""

    index: int
    cls: int
    true: int

    def as_dict(self) -> dict:
        return {"index": self.index, "true": self.true, "class": self.cls}


def sample_targets(test_set, n: int, rule: Literal["random-other", "all-classes"] = "random-other",
                   seed: int = 0) -> list[Target]:
    """`n` seeded test images, each with one random class != its label, or with every other class."""
    if n > len(test_set):
        raise UserError(f"targets: asked for {n} test images, the test set has {len(test_set)}")
    rng = np.random.default_rng(seed)
    images = rng.choice(len(test_set), size=n, replace=False)
    out = []
    for i in images:
        true = int(test_set.y[i])
        others = [c for c in range(test_set.num_classes) if c != true]
        if rule == "random-other":
            out.append(Target(int(i), int(rng.choice(others)), true))
        elif rule == "all-classes":
            out.extend(Target(int(i), c, true) for c in others)
        else:
            raise UserError(f"targets: unknown rule {rule!r}; use 'random-other' or 'all-classes'")
    return out


def measurement(model: nn.Module, x_star: torch.Tensor, t: int) -> torch.Tensor:
    """f = log p(t | x*) under `model` (a differentiable scalar)."""
    return torch.log_softmax(model(x_star.unsqueeze(0)), -1)[0, t]


def measurement_gradient(model: nn.Module, x_star: torch.Tensor, t: int) -> torch.Tensor:
    """grad_theta f, flattened over the trainable parameters (eval mode)."""
    model.eval()
    params = list(trainable_parameters(model).values())
    device = params[0].device
    return flatten(torch.autograd.grad(measurement(model, x_star.to(device), t), params)).detach().cpu()


@torch.no_grad()
def measure(model: nn.Module, x_star: torch.Tensor, t: int) -> dict:
    """p(t | x*), log-odds of t against the rest, and whether t is the top-1 class."""
    model.eval()
    device = next(model.parameters()).device
    logp = torch.log_softmax(model(x_star.unsqueeze(0).to(device)).double(), -1)[0]
    p = float(logp[t].exp())
    rest = float(torch.logsumexp(torch.cat([logp[:t], logp[t + 1:]]), 0))
    return {"p": p, "logodds": float(logp[t]) - rest, "top1": bool(int(logp.argmax()) == t)}

