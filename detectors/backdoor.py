"""Detectors that reason about triggers: a backdoored model obeys a small pattern whatever else is in the image.

STRIP blends each document with others and looks for predictions that do not move (the trigger dominates);
Neural Cleanse reverse-engineers, per class, the smallest trigger that sends every image there, names the class
whose trigger is abnormally small, and scores every document by how much of that trigger it carries. Both read
the model trained on the suspect data and the suspect data only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from infusion_audit.io import iter_chunks
from infusion_audit.registry import DETECTORS

from .base import ENABLE_HINTS, AuditContext, Detector, check_choice, top_k_mask

MAD_SCALE = 1.4826  # the median absolute deviation of a normal sample, over its standard deviation


class _ImageModelDetector(Detector):
    """A detector that feeds images of its own making through the model: it needs the model itself. It runs only
    when named (a backdoor audit names it): a plain scan or bench does not pay for its many forward passes."""

    needs = frozenset({"logits"})
    knowledge = "model"
    data_kinds = frozenset({"image"})
    by_default = False

    def missing(self, context: AuditContext) -> str | None:
        lacking = super().missing(context)
        if lacking is None and context.model is None:
            return f"needs {ENABLE_HINTS['model']}"
        return lacking


@DETECTORS.register("strip")
class STRIP(_ImageModelDetector):
    """Gao et al. 2019, per training document: how little the model's prediction moves when others are superimposed.

    Each document is superimposed on `overlays` documents of the suspect set drawn at random (seeded), and scored
    by minus the mean entropy (bits) of the model's predictions on the superimpositions. A clean image's prediction wanders with what is superimposed; one
    carrying a trigger keeps the trigger's class: low entropy, high score. `superimpose`: "add" (the two images
    summed and clipped to the value range, the paper's) or "blend" (alpha x + (1 - alpha) x', ART's). Flags the
    1.5·ε·N highest."""

    def __init__(self, overlays: int = 20, superimpose: str = "add", alpha: float = 0.5, seed: int = 0,
                 batch_size: int = 1024):
        check_choice("superimpose", superimpose, ("add", "blend"))
        if overlays < 1 or not 0 < alpha < 1:
            raise ValueError(f"need overlays >= 1 and 0 < alpha < 1, got overlays={overlays}, alpha={alpha}")
        self.overlays, self.superimpose, self.alpha, self.seed, self.batch_size = \
            overlays, superimpose, alpha, seed, batch_size

    @torch.no_grad()
    def score(self, context: AuditContext) -> np.ndarray:
        model, x = context.model.eval(), context.data.x
        n = len(x)
        param = next(model.parameters())
        partners = np.random.default_rng(self.seed).integers(0, n, size=(n, self.overlays))
        entropy = np.zeros(n)
        per_chunk = max(1, self.batch_size // self.overlays)
        for chunk in iter_chunks(n, per_chunk):
            own, other = np.repeat(x[chunk], self.overlays, axis=0), x[partners[chunk].ravel()]
            if self.superimpose == "add":
                blends = np.clip(own + other, *getattr(context.data, "value_range", (0.0, 1.0)))
            else:
                blends = self.alpha * own + (1 - self.alpha) * other
            logp = torch.log_softmax(model(torch.as_tensor(blends).to(param.device, param.dtype)).double(), -1)
            bits = -(logp.exp() * logp).sum(1) / math.log(2)
            entropy[chunk] = bits.view(-1, self.overlays).mean(1).cpu().numpy()
        self.details_ = {"entropy_median": float(np.median(entropy)), "entropy_min": float(entropy.min())}
        return -entropy


@DETECTORS.register("neural-cleanse")
class NeuralCleanse(_ImageModelDetector):
    """Wang et al. 2019: the class whose reverse-engineered trigger is abnormally small, and who carries that trigger.

    For each class c, the smallest trigger (mask m in [0, 1]^(H x W), pattern p) that sends
    `sample` documents of the other classes (seeded) to c: Adam on CE(model((1 - m) x + m p), c) + λ·|m|₁ for
    `steps` steps, λ raised by `cost_multiplier` after an epoch whose reversed trigger reaches
    `success_threshold` of its images and lowered otherwise (the paper's schedule); the smallest successful mask
    is kept. A backdoored class needs a far smaller mask than the others: each class below the median L1 gets
    the anomaly index (median - L1) / (1.4826·MAD); the class with the largest is the suspect, judged
    backdoored above `threshold` (2, the paper's). Every document is scored by how much of the suspect class's
    trigger it carries, 1 - Σ m|x - p| / (Σ m · range) in [0, 1], plus 1 when it is labelled with that class
    (a trigger in a document of its class is what poisoning needs). With no class judged backdoored the ranking
    stands and nothing is flagged; otherwise the 1.5·ε·N highest are."""

    def __init__(self, steps: int = 200, batch_size: int = 64, lr: float = 0.05, init_cost: float = 1e-3,
                 cost_multiplier: float = 1.5, success_threshold: float = 0.99, threshold: float = 2.0,
                 sample: int = 1000, seed: int = 0):
        if steps < 1 or batch_size < 1 or sample < 2 or cost_multiplier <= 1 or not 0 < success_threshold <= 1:
            raise ValueError("need steps >= 1, batch_size >= 1, sample >= 2, cost_multiplier > 1 and "
                             "0 < success_threshold <= 1")
        self.steps, self.batch_size, self.lr, self.init_cost = steps, batch_size, lr, init_cost
        self.cost_multiplier, self.success_threshold, self.threshold = cost_multiplier, success_threshold, threshold
        self.sample, self.seed = sample, seed

    def reverse(self, context: AuditContext, cls: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The smallest trigger found for class `cls`: mask (H, W), pattern (C, H, W) and the mask's L1."""
        model, data = context.model.eval(), context.data
        param = next(model.parameters())
        lo, hi = getattr(data, "value_range", (0.0, 1.0))
        others = np.flatnonzero(context.labels != cls)
        rng = np.random.default_rng([self.seed, cls])
        pool = rng.choice(others, min(self.sample, len(others)), replace=False)
        x = torch.as_tensor(data.x[pool]).to(param.device, param.dtype)
        _, channels, height, width = x.shape
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        mask_w = torch.randn((1, 1, height, width), generator=gen).to(param.device, param.dtype).requires_grad_(True)
        pattern_w = torch.randn((1, channels, height, width), generator=gen).to(param.device, param.dtype)
        pattern_w.requires_grad_(True)
        optimiser = torch.optim.Adam([mask_w, pattern_w], lr=self.lr, betas=(0.5, 0.9))
        cost, best, hits, seen = self.init_cost, None, 0, 0
        batches = max(1, math.ceil(len(x) / self.batch_size))
        order = torch.randperm(len(x), generator=gen)
        labels = torch.full((len(x),), cls, device=param.device)
        for step in range(self.steps):
            b = step % batches
            index = order[b * self.batch_size:(b + 1) * self.batch_size].to(param.device)
            mask = torch.sigmoid(mask_w)
            pattern = lo + (hi - lo) * torch.sigmoid(pattern_w)
            logits = model((1 - mask) * x[index] + mask * pattern)
            loss = F.cross_entropy(logits, labels[index]) + cost * mask.sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            hits += int((logits.argmax(1) == cls).sum())
            seen += len(index)
            if b == batches - 1 or step == self.steps - 1:  # an epoch over the sample: judge it, adjust λ
                l1 = float(mask.detach().sum())
                if hits >= self.success_threshold * seen:
                    if best is None or l1 < best[2]:
                        best = (mask.detach()[0, 0].cpu().numpy(), pattern.detach()[0].cpu().numpy(), l1)
                    cost *= self.cost_multiplier
                else:
                    cost /= self.cost_multiplier ** 1.5
                hits = seen = 0
        if best is None:  # never reached the success threshold: the last mask, its L1 as found
            best = (torch.sigmoid(mask_w).detach()[0, 0].cpu().numpy(),
                    (lo + (hi - lo) * torch.sigmoid(pattern_w)).detach()[0].cpu().numpy(),
                    float(torch.sigmoid(mask_w).detach().sum()))
        return best

    def score(self, context: AuditContext) -> np.ndarray:
        classes = range(context.num_classes)
        triggers = {c: self.reverse(context, c) for c in classes if (context.labels != c).sum() >= 2}
        l1 = np.array([triggers[c][2] for c in triggers])
        median = float(np.median(l1))
        mad = MAD_SCALE * float(np.median(np.abs(l1 - median)))
        index = {c: (median - t[2]) / mad if mad > 0 else 0.0 for c, t in triggers.items()}
        suspect = max(index, key=lambda c: index[c])
        mask, pattern, _ = triggers[suspect]
        lo, hi = getattr(context.data, "value_range", (0.0, 1.0))
        x = context.data.x
        distance = (mask[None, None] * np.abs(x - pattern[None])).mean(1).sum((1, 2))
        carry = 1 - distance / max(float(mask.sum()) * (hi - lo), 1e-12)
        self.infected_ = index[suspect] > self.threshold
        self.details_ = {"suspect_class": int(suspect), "anomaly_index": round(float(index[suspect]), 4),
                         "backdoored": bool(self.infected_),
                         "mask_l1": {int(c): round(t[2], 3) for c, t in triggers.items()}}
        return carry + (context.labels == suspect)

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        if not self.infected_:
            return np.zeros(len(scores), dtype=bool)
        return top_k_mask(scores, context.removal_budget(len(scores)))
