"""Baselines that tell whether Infusion's edits matter: the same documents with random noise of the
same budget, relabelled to the target class, or replaced by the target image itself."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np

from ..behaviour import Target
from ..registry import ATTACKS
from .base import Attack, AttackContext, Poisoning, Selection, project, store


@ATTACKS.register("random-noise")
class RandomNoise(Attack):
    """The documents Infusion would edit, perturbed by random noise of the same budget (a null control).

    Alone, it edits the documents `selection` picks (by default the influence recipe's, the most negative). With
    `like` (an attack name) the evaluation hands it the poisoning of the first arm of that name, on the same
    target, seed and budget: exactly its documents, so the difference is the edit alone (the default Infusion
    picks its documents by gain through the replayed retrain, which no selection rule here reproduces)."""

    def __init__(self, k: int | float = 0.01, eps: float = 1 / 16, norm: Literal["linf", "l2"] = "linf",
                 selection: Selection = "most-negative", quantize: bool = True, seed: int = 0,
                 like: str | None = None):
        self.k, self.eps, self.norm, self.selection, self.quantize, self.seed = k, eps, norm, selection, quantize, seed
        self.like = like

    def variant(self) -> str:
        return ("quantized" if self.quantize else "float") + (f",like {self.like}" if self.like else "")

    def craft(self, context: AttackContext, target: Target, like: Poisoning | None = None) -> Poisoning:
        import torch

        t0 = time.perf_counter()
        index = like.indices if like is not None else context.select(target, context.budget_k(self.k),
                                                                      self.selection, self.seed)
        train = context.train
        x0 = train.x[index]
        rng = np.random.default_rng([self.seed, target.index, target.cls, 1])
        if self.norm == "linf":  # every value at the budget's edge, like saturated sign-PGD
            delta = self.eps * rng.choice([-1.0, 1.0], size=x0.shape)
        else:
            delta = rng.standard_normal(x0.shape)
            delta *= self.eps / np.linalg.norm(delta.reshape(len(x0), -1), axis=1).reshape(-1, *[1] * (x0.ndim - 1))
        x = project(torch.from_numpy(x0 + delta.astype(np.float32)), torch.from_numpy(x0), self.eps, self.norm,
                    train.value_range).numpy()
        if self.quantize:
            x = store(train, x, x0, self.eps, self.norm)
        return Poisoning(index, x.astype(np.float32), train.y[index].copy(),
                         {"timings": {"select": time.perf_counter() - t0}})


@ATTACKS.register("label-flip")
class LabelFlip(Attack):
    """The most influential documents not already of the target class, relabelled to it (visible: labels change)."""

    def __init__(self, k: int | float = 0.01, selection: Selection = "most-negative", seed: int = 0):
        self.k, self.selection, self.seed = k, selection, seed

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        t0 = time.perf_counter()
        # documents already labelled t would not change: only the others are flipped
        index = context.select(target, context.budget_k(self.k), self.selection, self.seed,
                               eligible=context.train.y != target.cls)
        return Poisoning(index, context.train.x[index].copy(), np.full(len(index), target.cls, dtype=np.int64),
                         {"timings": {"select": time.perf_counter() - t0}})


@ATTACKS.register("probe-insertion")
class ProbeInsertion(Attack):
    """The target image itself, labelled with the target class, in place of `copies` documents (default k).

    The replaced documents are random by default: replacing the most influential ones would also remove
    their help and understate the baseline."""

    def __init__(self, k: int | float = 0.01, copies: int | None = None, selection: Selection = "random",
                 seed: int = 0):
        # a fixed number of copies is the budget: the same attack under every k (and the same benchmark cell)
        self.k, self.copies, self.selection, self.seed = k if copies is None else copies, copies, selection, seed

    def variant(self) -> str:
        return "xk" if self.copies is None else f"x{self.copies}"

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        t0 = time.perf_counter()
        count = context.budget_k(self.k)
        index = context.select(target, count, self.selection, self.seed)
        x_star = context.test.x[target.index]
        return Poisoning(index, np.repeat(x_star[None], count, axis=0), np.full(count, target.cls, dtype=np.int64),
                         {"timings": {"select": time.perf_counter() - t0}})
