"""Influence-based detection: which documents the trained model's predictions depend on unusually.

Sign convention (kronfluence's, as in the attack): s_i = ∇f^T (G + λI)^-1 ∇L(z_i). Up-weighting
document i changes f by about -ε·s_i, so the most NEGATIVE s_i are the documents that push f up:
for a behaviour an attacker wants, these are the suspects.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from infusion_audit.errors import PluginError
from infusion_audit.registry import DETECTORS

from .base import AuditContext, Detector, check_choice, robust_z


@DETECTORS.register("influence-outlier")
class InfluenceOutlier(Detector):
    """Self-influence, concentrated influence on probe behaviours, or forensic attribution to a known behaviour.

    `mode`:
      - "forensic" (needs the behaviour x* -> t): score = -s_i for f = log p(t | x*); the documents
        most helpful to the suspicious prediction rank first.
      - "probe" (target unknown): every probe input x every class is a candidate behaviour; a
        document scores by how extreme its help to its most-helped behaviour is, as a robust z
        against all documents' help to that behaviour. Probe inputs are `probe_size` of the
        context's held-out `probe` set (or, without one, of the suspect documents).
      - "self": self-influence g_iᵀ(G+λI)^-1 g_i (atypical and mislabelled documents).
      - "auto": forensic when the behaviour is given, else probe.
    The inverse Hessian comes from the context (EK-FAC by default, fitted once and shared; with the
    "projected" backend every gradient is projected layer by layer first, which scales to 50,000
    CIFAR-sized documents on a CPU).
    """

    needs = frozenset({"gradients"})
    data_kinds = frozenset({"image"})  # probes relabel classes; text-influence is the text version
    knowledge = "model"
    MODES = ("auto", "forensic", "probe", "self")

    def __init__(self, mode: str = "auto", probe_size: int = 100, chunk_size: int = 256, seed: int = 0):
        check_choice("mode", mode, self.MODES)
        self.mode = mode
        self.probe_size = probe_size
        self.chunk_size = chunk_size
        self.seed = seed

    def resolved_mode(self, context: AuditContext) -> str:
        if self.mode == "auto":
            return "forensic" if context.has("behaviour") else "probe"
        return self.mode

    def missing(self, context: AuditContext) -> str | None:
        lacking = super().missing(context)
        if lacking is not None:
            return lacking
        mode = self.resolved_mode(context)
        if mode == "forensic" and not context.has("behaviour"):
            return f"mode 'forensic' needs {context.hint('behaviour')}"
        if mode == "probe":  # every probe x class gradient is held at once, and once more preconditioned
            queries = min(self.probe_size, len(context.probe if context.probe is not None else context)) \
                * context.num_classes
            held = 2 * queries * context.influence_row_bytes()
            if held > context.gradient_cache_bytes:
                return (f"mode 'probe' would hold {queries} probe gradients of this model, {held / 2 ** 30:.1f} GiB, "
                        f"more than the {context.gradient_cache_bytes / 2 ** 30:.1f} GiB allowed for gradients; "
                        "use mode 'self' or 'forensic', or a smaller probe_size")
        return None

    def knowledge_level(self, context: AuditContext) -> str:
        return "forensic" if self.resolved_mode(context) == "forensic" else "model"

    def score(self, context: AuditContext) -> np.ndarray:
        mode = self.resolved_mode(context)
        ihvp = context.ihvp()
        self.details_ = {"mode": mode, "ihvp": ihvp.backend, "damping": ihvp.damping}
        if mode == "self":
            out = np.zeros(len(context))
            for chunk, grads in context.influence_chunks(self.chunk_size):
                out[chunk] = (grads.double() * ihvp.solve_many(grads).double()).sum(1).numpy()
            return out
        queries = context.influence_rows(self._forensic_query(context)) if mode == "forensic" \
            else self._probe_queries(context)
        influence = context.influence_products(ihvp.solve_many(queries), self.chunk_size)
        if mode == "forensic":
            return -influence[:, 0]
        self.details_["probes"] = len(queries)
        return most_helped(influence)

    def _forensic_query(self, context: AuditContext) -> torch.Tensor:
        from infusion_audit.behaviour import measurement_gradient

        return measurement_gradient(context.model, context.behaviour)[None]

    def _probe_queries(self, context: AuditContext) -> torch.Tensor:
        """∇θ log p(c | x_j) for every probe input x_j and class c: minus the CE gradient with label c."""
        source = context.probe if context.probe is not None else context.data
        if not dataclasses.is_dataclass(source) or not hasattr(source, "y"):
            raise PluginError("influence-outlier mode 'probe' needs a classification dataset to probe; "
                              "use mode 'self' or 'forensic'")
        rng = np.random.default_rng(self.seed)
        chosen = np.sort(rng.choice(len(source), size=min(self.probe_size, len(source)), replace=False))
        inputs = source.subset(chosen)
        queries = []
        for c in range(context.num_classes):
            relabelled = dataclasses.replace(inputs, y=np.full(len(inputs), c, dtype=np.int64))
            queries.append(-context.influence_gradients(relabelled))
        return torch.cat(queries)


def most_helped(influence: np.ndarray) -> np.ndarray:
    """The probe mode's score from (documents, behaviours) influence: each document's largest robust z of
    help (-influence) to one behaviour, against every document's help to it."""
    return np.column_stack([robust_z(-influence[:, j]) for j in range(influence.shape[1])]).max(1)
