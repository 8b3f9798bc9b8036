"""Detection as an engine: run detectors on an audit context and, with ground truth, measure them.

`detect` is the one call that `scan()`, every bench cell and the unedited null all make: it builds each
detector (bad names and params fail before any work), runs it on the context (a detector whose needs are
unmet, or that fails, is recorded as skipped with the reason, never raised), and with `truth` computes the
detection figures with bootstrap CIs. `UneditedNull` gives each figure its null: the same documents
unedited, scored with the clean control's model, so a figure can be read as what the edit adds.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from .config import InfluenceConfig, PluginSpec, ScanConfig
from .detectors import AuditContext, DetectorRun, audit_context, build_detector, run_detector
from .errors import DataError, UserError
from .metrics import detection_metrics
from .registry import DETECTORS

log = logging.getLogger(__name__)

UNEDITED_METRICS = ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "recall_at_k")  # the null of each figure


def detector_specs(detectors: str | Sequence[str | PluginSpec] | None, data: Any) -> list[PluginSpec]:
    """Detector names ("a,b" or a list) or PluginSpecs as specs; None or empty: every registered detector
    that scores this kind of data and runs by default."""
    if isinstance(detectors, str):
        detectors = [name.strip() for name in detectors.split(",") if name.strip()]
    if detectors:
        return [PluginSpec(d) if isinstance(d, str) else d for d in detectors]
    return [PluginSpec(n) for n in DETECTORS.names() if (d := build_detector(n)).by_default and d.applies_to(data)]


def detector_label(spec: PluginSpec) -> str:
    """Column-safe name of a detector configuration: the name, plus its parameters if it has any."""
    if not spec.params:
        return spec.name
    return spec.name + "(" + ";".join(f"{k}={v}" for k, v in sorted(spec.params.items())) + ")"


def truth_mask(truth: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Ground truth (poisoned indices, or a boolean mask) as a mask over `n` documents."""
    truth = np.asarray(truth)
    if truth.dtype == bool:
        if truth.shape != (n,):
            raise DataError(f"ground-truth mask has shape {truth.shape}, the data has {n} documents")
        return truth
    if truth.size and (truth.min() < 0 or truth.max() >= n):
        raise DataError(f"ground truth lists documents outside 0..{n - 1}")
    mask = np.zeros(n, dtype=bool)
    mask[truth.astype(np.int64)] = True
    return mask


def evaluate_run(run: DetectorRun, truth: np.ndarray, labels: np.ndarray | None = None,
                 bootstrap: int = 1000) -> dict:
    """The detection figures of one detector run: metrics with CIs, plus detector, knowledge, seconds."""
    record = {"detector": run.name, "params": run.params, "knowledge": run.knowledge,
              "seconds": round(run.seconds, 4)}
    record.update(detection_metrics(truth, run.scores, run.flagged, labels=labels, n_boot=bootstrap))
    return record


@dataclass
class Detection:
    """Every detector's run on one context, in the order asked (`specs`, named by `labels`), and with ground
    truth (`truth`, a mask) the figures of each that ran (`figures`, label -> detection figures)."""

    context: AuditContext
    specs: list[PluginSpec]
    runs: list[DetectorRun]
    labels: list[str]
    truth: np.ndarray | None = None
    figures: dict = field(default_factory=dict)

    @property
    def completed(self) -> list[tuple[str, DetectorRun]]:
        return [(label, run) for label, run in zip(self.labels, self.runs) if run.skipped is None]

    @property
    def skipped(self) -> dict[str, str]:
        """Detector label -> why it did not run: what it needs, or how it failed."""
        return {label: run.skipped for label, run in zip(self.labels, self.runs) if run.skipped is not None}

    @property
    def failed(self) -> dict[str, str]:
        """Detector label -> the error it raised ("Type: first line"), for those of `skipped` that raised."""
        return {label: run.error for label, run in zip(self.labels, self.runs) if run.error is not None}

    @property
    def ranks(self) -> dict[str, np.ndarray]:
        """Detector -> rank of every document, 1 = most suspicious (ties share the best rank)."""
        return {label: rankdata(-run.scores, method="min").astype(int) for label, run in self.completed}


def detect(context: AuditContext, specs: Sequence[PluginSpec], truth: Any = None, bootstrap: int = 1000,
           known: dict[str, DetectorRun] | None = None) -> Detection:
    """Run the detectors `specs` on `context`; with `truth` (poisoned indices or a mask) measure each that ran.
    `known`: runs already made on these documents, by label, reused instead of run again."""
    built = [build_detector(s.name, s.params) for s in specs]  # bad names and params fail before any work
    labels = [detector_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"the same detector configuration is listed twice: {labels}")
    known = known or {}
    runs = []
    for label, detector in zip(labels, built):
        if label not in known:
            log.info("running %s", label)
        runs.append(known[label] if label in known else run_detector(detector, context))
    detection = Detection(context, list(specs), runs, labels)
    if truth is not None:
        detection.truth = truth_mask(truth, len(context))
        detection.figures = {label: evaluate_run(run, detection.truth, context.labels, bootstrap)
                             for label, run in detection.completed}
    return detection


class UneditedNull:
    """The null of each detection figure: the documents an attack edited, as they were before the edit,
    scored by the same detectors with the clean control's model. What a detector finds here comes from the
    attack's choice of documents alone; the difference is what the edit adds.

    Only a forensic run reads the behaviour: every other detector scores the clean set the same in every cell,
    so its run is made once per null and reused; a forensic one once per behaviour."""

    def __init__(self, clean, model, options: ScanConfig, influence: InfluenceConfig):
        self.clean, self.model, self.options, self.influence = clean, model, options, influence
        self._context: AuditContext | None = None
        self._runs: dict = {}

    def context(self, behaviour) -> AuditContext:
        """The clean set as the defender's detectors see it, with `behaviour`: one shared cache of features,
        gradients and influence factors, each cell's behaviour on a shallow copy (the cache is not copied)."""
        if self._context is None:
            self._context = audit_context(self.clean, self.model, reference=self.clean,
                                          expected_fraction=self.options.expected_fraction, progress=False,
                                          features_layer=self.options.features_layer, influence=self.influence)
        context = copy.copy(self._context)
        context.behaviour = behaviour
        return context

    def figures(self, scanned: Detection, indices: np.ndarray, behaviour, target) -> dict[str, dict]:
        """Per detector label of `scanned` (a cell's detection), the `<metric>_unedited` fields of the documents
        `indices` unedited, for `behaviour` (the cell's `target`)."""
        keys = {label: (label, target if run.knowledge == "forensic" else None) for label, run in scanned.completed}
        known = {label: self._runs[key] for label, key in keys.items() if key in self._runs}
        specs = [spec for spec, run in zip(scanned.specs, scanned.runs) if run.skipped is None]
        null = detect(self.context(behaviour), specs, truth=indices, bootstrap=0, known=known)
        for label, run in zip(null.labels, null.runs):
            self._runs.setdefault(keys[label], run)
        return {label: {**{f"{m}_unedited": null.figures[label][m] for m in UNEDITED_METRICS
                           if m in null.figures[label]}, "unedited_model": "clean control"}
                for label, _ in null.completed}
