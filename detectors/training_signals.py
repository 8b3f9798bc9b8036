"""The simplest baseline: documents the trained model finds hard (high loss, large gradient)."""

from __future__ import annotations

import numpy as np
import torch

from infusion_audit.registry import DETECTORS

from .base import AuditContext, Detector, check_choice


@DETECTORS.register("loss-outlier")
class LossOutlier(Detector):
    """Training loss or gradient norm of each document under the model trained on it.

    `signal`: "loss" (cross-entropy; needs only the logits), "grad-norm" (norm of the full
    per-example gradient, streamed in chunks) or "head-grad-norm" (norm of the last layer's
    gradient, ||softmax - onehot|| · sqrt(||h||² + 1), from penultimate features and logits alone:
    cheap at any scale; exact when the features are the input of a Linear head with a bias).
    """

    needs = frozenset({"losses"})
    knowledge = "model"
    SIGNALS = ("loss", "grad-norm", "head-grad-norm")
    SIGNAL_NEEDS = {"loss": needs, "grad-norm": frozenset({"gradients"}),
                    "head-grad-norm": frozenset({"logits", "features"})}

    def __init__(self, signal: str = "loss"):
        check_choice("signal", signal, self.SIGNALS)
        self.signal = signal

    def required(self) -> frozenset:
        return self.SIGNAL_NEEDS[self.signal]

    def score(self, context: AuditContext) -> np.ndarray:
        if self.signal == "loss":
            return context.losses()
        if self.signal == "head-grad-norm":
            logits = torch.from_numpy(context.logits()).double()
            residual = torch.softmax(logits, 1)
            residual[torch.arange(len(residual)), torch.from_numpy(context.labels)] -= 1.0
            feats = torch.from_numpy(context.features()).double()
            return (residual.norm(dim=1) * torch.sqrt((feats ** 2).sum(1) + 1.0)).numpy()
        return context.cached("gradient_norms", lambda: np.concatenate(
            [g.double().norm(dim=1).numpy() for _, g in context.gradient_chunks()]))
