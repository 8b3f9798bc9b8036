"""Detectors that look at the documents themselves, with or without a trusted reference copy.

With a reference every edit is visible and the question is how to rank edits by size. Without
one, an edit shows only when it breaks what the storage format allows (values outside the range,
values off the grid the format stores) or leaves unusual high-frequency energy for its class.
"""

from __future__ import annotations

import numpy as np

from infusion_audit.io import iter_chunks
from infusion_audit.registry import DETECTORS

from .base import AuditContext, Detector, check_choice, robust_z

# Storage grids a float file may hold without saying so: sklearn digits (17 grey levels), 8-bit images.
KNOWN_GRIDS = (1.0 / 16.0, 1.0 / 255.0)
GRID_TOL = 1e-4
# A document breaking the storage format ranks above every document that does not.
VIOLATION_OFFSET = 1000.0


def infer_grid(x: np.ndarray, min_share: float = 0.9, sample: int = 2000) -> float | None:
    """The coarsest known grid on which at least `min_share` of (a seeded sample of) documents lie entirely."""
    if len(x) > sample:
        x = x[np.sort(np.random.default_rng(0).choice(len(x), sample, replace=False))]
    flat = x.reshape(len(x), -1)
    for grid in KNOWN_GRIDS:
        if np.mean(off_grid_counts(flat, grid) == 0) >= min_share:
            return grid
    return None


def off_grid_counts(flat: np.ndarray, grid: float, lo: float = 0.0) -> np.ndarray:
    steps = (flat.astype(np.float64) - lo) / grid
    return (np.abs(steps - np.round(steps)) > GRID_TOL / grid).sum(1)


def laplacian_energy(x: np.ndarray) -> np.ndarray:
    """Mean squared residual of a 4-neighbour Laplacian (edge-replicated), per document."""
    padded = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    lap = (padded[:, :, :-2, 1:-1] + padded[:, :, 2:, 1:-1] + padded[:, :, 1:-1, :-2] + padded[:, :, 1:-1, 2:]
           - 4 * padded[:, :, 1:-1, 1:-1])
    return (lap.astype(np.float64) ** 2).reshape(len(x), -1).mean(1)


@DETECTORS.register("perturbation-norm")
class PerturbationNorm(Detector):
    """Per-document edit size against a reference copy; without one, format violations and high-frequency energy.

    With a reference: the score is the edit's `norm` ("linf", "l2" or "changed": values changed);
    a changed label ranks above every pixel edit; every changed document is flagged. Without:
    a document with values outside the range or off the storage grid scores above 1000 (the share
    of such values adds to that), the rest score by the robust z of their log Laplacian energy
    within their class; flagged are the violators and documents with z > `z_threshold`.
    """

    needs = frozenset({"data"})
    knowledge = "data"
    data_kinds = frozenset({"image"})
    NORMS = ("linf", "l2", "changed")

    def __init__(self, norm: str = "l2", use_reference: bool = True, grid: float | str | None = "auto",
                 z_threshold: float = 4.0):
        check_choice("norm", norm, self.NORMS)
        if not (grid in ("auto", None) or (isinstance(grid, (int, float)) and grid > 0)):
            raise ValueError(f"grid must be 'auto', null or a positive step, got {grid!r}")
        self.norm = norm
        self.use_reference = use_reference
        self.grid = grid
        self.z_threshold = z_threshold

    def _uses_reference(self, context: AuditContext) -> bool:
        return self.use_reference and context.has("reference")

    def knowledge_level(self, context: AuditContext) -> str:
        return "reference" if self._uses_reference(context) else "data"

    def score(self, context: AuditContext) -> np.ndarray:
        if self._uses_reference(context):
            return self._score_against_reference(context)
        return self._score_without_reference(context)

    def _score_against_reference(self, context: AuditContext) -> np.ndarray:
        data, ref = context.data, context.reference
        delta = (data.x.astype(np.float64) - ref.x.astype(np.float64)).reshape(len(data), -1)
        size = {"linf": lambda d: np.abs(d).max(1), "l2": lambda d: np.linalg.norm(d, axis=1),
                "changed": lambda d: (np.abs(d) > 1e-7).sum(1).astype(np.float64)}[self.norm](delta)
        relabelled = np.asarray(data.y) != np.asarray(ref.y)
        scores = size + relabelled * (size.max() + 1.0)
        self.decision_ = (size > 1e-7) | relabelled
        self.details_ = {"mode": "reference", "changed": int(self.decision_.sum()), "relabelled": int(relabelled.sum())}
        return scores

    def _score_without_reference(self, context: AuditContext) -> np.ndarray:
        data = context.data
        lo, hi = getattr(data, "value_range", (0.0, 1.0))
        grid = self._grid(data)
        n = len(data)
        out_of_range, off_grid, energy = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
        for chunk in iter_chunks(n, 4096):  # bounded memory at any dataset size
            x = data.x[chunk]
            flat = x.reshape(len(x), -1)
            out_of_range[chunk] = ((flat < lo - GRID_TOL) | (flat > hi + GRID_TOL)).sum(1)
            if grid:
                off_grid[chunk] = off_grid_counts(flat, grid, lo)
            energy[chunk] = laplacian_energy(x)
        violating = np.maximum(out_of_range, off_grid)
        hf = robust_z(np.log(energy + 1e-12), context.labels)
        size = int(np.prod(data.x.shape[1:]))
        scores = np.where(violating > 0, VIOLATION_OFFSET + violating / size, np.minimum(hf, VIOLATION_OFFSET - 1))
        self.decision_ = (violating > 0) | (hf > self.z_threshold)
        self.details_ = {"mode": "no-reference", "grid": grid, "out_of_range": int((out_of_range > 0).sum()),
                         "off_grid": int((off_grid > 0).sum()), "high_frequency": int((hf > self.z_threshold).sum())}
        return scores

    def _grid(self, data) -> float | None:
        if self.grid != "auto":
            return self.grid
        return getattr(data, "grid", None) or infer_grid(data.x)

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        return self.decision_.copy()
