"""Detector-aware Infusion: the adaptive attacker a defence has to be judged against.

The attacker has the clean training set and its own model (not the defender's). It runs the
detectors it expects on that clean set and edits only documents they would not single out
(evasive selection), and it climbs the influence objective minus a stealth penalty that keeps each
edited document's training loss and its penultimate-feature distance to its class centre inside
the clean documents' distribution (stealth-regularised PGD). Budgets, clamping and storage-grid
quantization are Infusion's. Self-influence is not penalised: its input-gradient needs a
differentiable inverse-Hessian product per step, many times the cost of the rest.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..detectors import AuditContext, build_detector, run_detector
from ..errors import UserError
from ..registry import ATTACKS
from ..runtime import model_device
from .base import AttackContext, Selection
from .infusion import Infusion


@ATTACKS.register("infusion-evasive")
class EvasiveInfusion(Infusion):
    """Infusion that avoids the documents named detectors flag and keeps its edits' loss and features typical.

    `evade`: detectors (registered names, each needing at most a model) run on the clean training set
    with the attacker's model; documents scoring above the `evade_quantile` of the clean scores of any
    of them are never chosen. `stealth` (λ): PGD ascends the influence gradient (scaled to unit mean
    magnitude per document, so λ means the same on any data) minus λ times the gradient of
    Σ relu(z - z_q)², z being the robust z-score of the document's log-loss (over all documents) and
    of its feature distance to its class centre (within its class), z_q the clean documents'
    `evade_quantile` of z. With no detectors and λ = 0 this is Infusion's influence preset.
    """

    default_preset = "influence"  # its evasive selection and stealth penalty act on the influence objective

    def __init__(self, k: int | float = 0.01, eps: float = 1 / 16, norm: Literal["linf", "l2"] = "linf",
                 step: float | None = None, steps: int = 20, selection: Selection = "most-negative",
                 quantize: bool = True, batch_size: int = 256, seed: int = 0, evade: list[str] | tuple = (),
                 evade_quantile: float = 0.9, stealth: float = 0.0):
        super().__init__(k, eps, norm, step, steps, selection, quantize, batch_size, seed)
        if isinstance(evade, str):
            evade = [evade]
        if not 0 < evade_quantile <= 1:
            raise UserError(f"infusion-evasive: evade_quantile must lie in (0, 1], got {evade_quantile}")
        if not stealth >= 0:
            raise UserError(f"infusion-evasive: stealth (λ) must be >= 0, got {stealth}")
        for name in evade:  # an unknown name or a detector with required params fails here, before any work
            build_detector(name)
        self.evade, self.evade_quantile, self.stealth = list(evade), float(evade_quantile), float(stealth)

    def variant(self) -> str:
        """Infusion's variant, the evaded detectors and the quantile they and the penalty hold to, and λ: each
        stealth setting of a sweep is its own arm in the report."""
        parts = [super().variant()]
        if self.evade:
            parts.append(f"evade={'+'.join(self.evade)}@{self.evade_quantile:g}")
        if self.stealth:  # the penalty holds each signal under the same quantile
            parts.append(f"λ={self.stealth:g}" + ("" if self.evade else f"@{self.evade_quantile:g}"))
        return ",".join(parts)

    # ---- what the attacker knows of the defence: detector scores and statistics of the clean set
    def _audit(self, context: AttackContext):
        """The detectors' view of the clean training set through the attacker's model (one shared forward pass)."""
        fraction = min(0.49, context.budget_k(self.k) / len(context.train))
        model = context.model
        return context.cached(f"audit:{fraction:.6g}", lambda: AuditContext(
            context.train, model=model, expected_fraction=fraction, progress=False,
            device=str(model_device(model))))

    def _eligible(self, context: AttackContext) -> np.ndarray | None:
        if not self.evade:
            return None
        audit = self._audit(context)
        keep = np.ones(len(context.train), dtype=bool)
        for name in self.evade:
            def compute(name=name) -> np.ndarray:
                run = run_detector(build_detector(name), audit)
                if run.skipped:
                    raise UserError(f"infusion-evasive: cannot evade {name!r} with the clean data and the "
                                    f"attacker's model: {run.skipped}")
                return run.scores

            scores = context.cached(f"evade:{name}:{audit.expected_fraction:.6g}", compute)
            keep &= scores <= np.quantile(scores, self.evade_quantile)
        return keep

    def _clean_statistics(self, context: AttackContext) -> dict:
        """Class centres, and per signal the robust centre, scale and the z a clean document stays under."""
        def compute() -> dict:  # on the model's device: the penalty reads them at every PGD step
            audit = self._audit(context)
            device = model_device(context.model)
            labels = audit.labels
            feats = torch.from_numpy(audit.features()).double()
            centres = torch.stack([feats[torch.from_numpy(labels == c)].mean(0) for c in range(audit.num_classes)])
            distance = (feats - centres[torch.from_numpy(labels)]).norm(dim=1).numpy()
            log_loss = np.log(np.maximum(audit.losses(), 1e-12))
            return {"centres": centres.float().to(device),
                    "log_loss": _robust_limits(log_loss, np.zeros_like(labels), 1, self.evade_quantile, device),
                    "distance": _robust_limits(distance, labels, audit.num_classes, self.evade_quantile, device)}

        return context.cached(f"stealth:{self.evade_quantile:g}", compute)

    def penalty(self, context: AttackContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over signals of relu(z - z_q)² for each document (0 for a document typical of the clean set)."""
        stats = self._clean_statistics(context)
        features, logits = self._audit(context).extractor(x)
        h = features.flatten(1)
        signals = {  # the loss over all documents (as loss-outlier ranks them), the distance within the class
            "log_loss": (torch.log(F.cross_entropy(logits, y, reduction="none").clamp_min(1e-12)), torch.zeros_like(y)),
            "distance": ((h - stats["centres"][y]).norm(dim=1), y)}
        total = torch.zeros(len(x), device=x.device)
        for name, (value, group) in signals.items():
            centre, scale, limit = (t[group] for t in stats[name])
            total = total + F.relu((value - centre) / scale - limit) ** 2
        return total

    def _ascent(self, context: AttackContext, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                n: int) -> torch.Tensor:
        g = super()._ascent(context, v, x, y, n)
        if not self.stealth:
            return g
        g = g / g.flatten(1).abs().mean(1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
        x = x.detach().clone().requires_grad_(True)
        (grad_penalty,) = torch.autograd.grad(self.penalty(context, x, y).sum(), x)
        return g - self.stealth * grad_penalty


def _robust_limits(values: np.ndarray, groups: np.ndarray, n_groups: int, quantile: float,
                   device: torch.device) -> tuple:
    """Per group: median, 1.4826·MAD and the `quantile` of the robust z-scores (float tensors on `device`,
    indexed by group)."""
    centre, scale, limit = np.zeros(n_groups), np.ones(n_groups), np.zeros(n_groups)
    for g in np.unique(groups):
        v = values[groups == g]
        centre[g] = np.median(v)
        scale[g] = max(1.4826 * np.median(np.abs(v - centre[g])), 1e-12)
        limit[g] = np.quantile((v - centre[g]) / scale[g], quantile)
    return tuple(torch.from_numpy(a).float().to(device) for a in (centre, scale, limit))
