"""Behaviours an attacker wants and a defender fears, and what the library asks of one.

A behaviour has a differentiable measurement `measure(model)` = f(theta), the quantity Infusion
raises and forensic influence attributes, and `figures(model)`: the dict records report, with at least
`p`, `logodds` and `top1`. Images: test image x* classified as class t, f = log softmax(model(x*))[t],
reported as p(t | x*), the log-odds of t against the other classes and whether t is the top-1 class.
Text behaviours (`infusion_audit.text.behaviours`) follow the same contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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


def measurement_gradient(model: nn.Module, behaviour) -> torch.Tensor:
    """grad_theta f for a behaviour, flattened over the trainable parameters (eval mode)."""
    model.eval()
    params = list(trainable_parameters(model).values())
    return flatten(torch.autograd.grad(behaviour.measure(model), params)).detach().cpu()


SHOWN_LOGODDS = math.log(1.5)  # shown: top-1 holds and the target is 1.5 times as likely as its alternative


def already_shown(behaviour, model: nn.Module) -> str | None:
    """In words, how `model` already shows a behaviour before any attack, else None: its top-1 holds and its
    log-odds are at least log 1.5 (p >= 0.6 of B against A; a randomly initialised model leans by less, p 0.55
    measured). An attack on such a target has little left to induce. Named as the records name the figures (p,
    logodds, top1)."""
    figures = behaviour.figures(model)
    if not (figures["top1"] and figures["logodds"] >= SHOWN_LOGODDS):
        return None
    share = f" at {figures['greedy']:.0%} of its probes" if "greedy" in figures else ""
    return (f"{behaviour.description or 'the behaviour'} already holds{share} before any attack "
            f"(p = {figures['p']:.2f}, logodds = {figures['logodds']:+.2f}, top1 = true)")


@torch.no_grad()
def measure(model: nn.Module, x_star: torch.Tensor, t: int) -> dict:
    """p(t | x*), log-odds of t against the rest, and whether t is the top-1 class."""
    model.eval()
    device = next(model.parameters()).device
    logp = torch.log_softmax(model(x_star.unsqueeze(0).to(device)).double(), -1)[0]
    p = float(logp[t].exp())
    rest = float(torch.logsumexp(torch.cat([logp[:t], logp[t + 1:]]), 0))
    return {"p": p, "logodds": float(logp[t]) - rest, "top1": bool(int(logp.argmax()) == t)}



@dataclass(frozen=True)
class ClassBehaviour:
    """Input `x` classified as class `cls`: the behaviour an image attack wants, and the suspicious
    prediction a forensic defender starts from."""

    x: np.ndarray
    cls: int
    description: str = ""

    @classmethod
    def from_target(cls, target: Target, test_set: Any) -> "ClassBehaviour":
        """From an attack's Target (test index, class) and the test set it indexes."""
        return cls(np.asarray(test_set.x[target.index]), int(target.cls),
                   f"test document {target.index} (label {target.true}) classified as {target.cls}")

    def _input(self, model: nn.Module) -> torch.Tensor:
        param = next(model.parameters())
        return torch.as_tensor(self.x).to(param.device, param.dtype)

    def measure(self, model: nn.Module) -> torch.Tensor:
        return measurement(model, self._input(model), self.cls)

    def figures(self, model: nn.Module) -> dict:
        return measure(model, self._input(model), self.cls)

    def as_dict(self) -> dict:
        return {"class": self.cls, "description": self.description, "shape": list(self.x.shape)}
