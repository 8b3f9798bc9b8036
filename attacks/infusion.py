"""Infusion: clean-label edits of the k most influential training documents, crafted by projected
gradient ascent on the influence of each document on the target's measurement."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch

from ..behaviour import Target
from ..influence import input_gradient, loss_gradient
from ..registry import ATTACKS
from .base import Attack, AttackContext, Poisoning, Selection


def project(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str, value_range: tuple[float, float]) -> torch.Tensor:
    """Back into the eps-ball around x0 (L-inf or L2 per document) and the dataset's value range."""
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        size = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
        delta = delta * torch.clamp(eps / size, max=1.0)
    return (x0 + delta).clamp(*value_range)


def store(dataset, x: np.ndarray, x0: np.ndarray, eps: float, norm: str) -> np.ndarray:
    """Round edits to the dataset's storage grid (so they survive being saved in its own format),
    pulling any value that rounding pushed past an L-inf budget back one grid step."""
    q = dataset.quantize(x)
    if norm == "linf" and dataset.grid:
        limit = np.floor(eps / dataset.grid + 1e-6) * dataset.grid
        q = dataset.quantize(x0 + np.clip(q - x0, -limit, limit))
    return q


@ATTACKS.register("infusion")
class Infusion(Attack):
    """Influence-guided clean-label edits of k training documents (Infusion, PGD on the influence). On a backdoor
    target it raises the backdoor's f (the triggered images' log p(target)): the trigger is never stamped on a
    training document, only on test inputs."""

    behaviour_kinds = frozenset({"targeted", "backdoor"})

    def __init__(self, k: int | float = 0.01, eps: float = 1 / 16, norm: Literal["linf", "l2"] = "linf",
                 step: float | None = None, steps: int = 20, selection: Selection = "most-negative",
                 quantize: bool = True, batch_size: int = 256, seed: int = 0):
        self.k, self.eps, self.norm, self.step, self.steps = k, eps, norm, step, steps
        self.selection, self.quantize, self.batch_size, self.seed = selection, quantize, batch_size, seed

    def variant(self) -> str:
        storage = "quantized" if self.quantize else "float"
        return storage if self.selection == "most-negative" else f"{storage},{self.selection}"

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        v = context.query(target)
        if self.selection != "random":
            context.scores(target)  # timed as its own (per-target, shared) stage
        t0 = time.perf_counter()
        index = context.select(target, context.budget_k(self.k), self.selection, self.seed,
                               eligible=self._eligible(context))
        t_select = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = context.train
        x0_all, y_all = train.batch(index)
        crafted = [self._pgd(context, v, x0_all[s:s + self.batch_size], y_all[s:s + self.batch_size])
                   for s in range(0, len(index), self.batch_size)]
        x = torch.cat(crafted).cpu().numpy()
        if self.quantize:
            x = store(train, x, train.x[index], self.eps, self.norm)
        t_pgd = time.perf_counter() - t0
        predicted = self._predicted_delta_f(context, v, x, index)
        return Poisoning(index, x.astype(np.float32), train.y[index].copy(),
                         {"timings": {**context.stage_seconds(target), "select": t_select, "pgd": t_pgd},
                          "predicted_delta_f": predicted})

    def _pgd(self, context: AttackContext, v: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        step = self.step if self.step is not None else 2.5 * self.eps / self.steps
        n = len(context.train)
        device = next(context.model.parameters()).device
        x0, y, v = x0.to(device), y.to(device), v.to(device)  # once, not at every step
        x = x0.clone()
        for _ in range(self.steps):
            g = self._ascent(context, v, x, y, n)
            if self.norm == "linf":
                x = x + step * g.sign()
            else:
                x = x + step * g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
            x = project(x, x0, self.eps, self.norm, context.train.value_range)
        return x.detach()

    def _eligible(self, context: AttackContext) -> np.ndarray | None:
        """Which documents may be chosen (a mask; None: all). Subclasses narrow it (detector-aware selection)."""
        return None

    def _ascent(self, context: AttackContext, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                n: int) -> torch.Tensor:
        """The direction PGD climbs from documents x: the input-gradient of their influence on f."""
        return input_gradient(context.model, x, y, v, n)

    @staticmethod
    def _predicted_delta_f(context: AttackContext, v: torch.Tensor, x: np.ndarray, index: np.ndarray) -> float:
        """First-order change of f (unit-norm v, so in arbitrary units): -(1/n) v^T sum_j [grad L(x'_j) - grad L(x_j)]."""
        train, model = context.train, context.model
        k, device = len(index), next(model.parameters()).device
        before = loss_gradient(model, train.batch(index, device)) * k
        after = loss_gradient(model, (torch.from_numpy(x).to(device), torch.from_numpy(train.y[index]).to(device))) * k
        return float(-(v @ (after - before).cpu()) / len(train))
