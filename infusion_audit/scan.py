"""`infusion-audit scan`: rank every document of a suspect dataset by several independent detectors.

The defender brings the data (an .npz, a PNG folder or a CIFAR-10 folder) and whatever else they
have: a trusted reference copy, a model trained on the data (else one is trained here with the
scenario's recipe), the suspicious behaviour, and, to measure the detectors, a ground-truth
manifest. Output: scores.csv (one row per document), summary.json (what ran, on what, with which
knowledge, and why anything was skipped) and, with ground truth, detection figures with CIs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm.auto import tqdm

from .version import __version__
from .config import PluginSpec, ScenarioConfig, TrainConfig, bounded, load_config, to_dict
from .data import (ImageDataset, images_from_arrays, load_suspect, png_shape, read_manifest, read_npy, read_npz,
                   read_png, unit_float_images)
from .errors import ConfigError, DataError, UserError
from .io import _jsonable, atomic_write_text, record_hash, run_lock, stable_hash, verified, write_json
from .metrics import detection_metrics
from .runtime import model_device, resolve_device

log = logging.getLogger(__name__)

# Above this many classes the labels are more likely garbage than a real label set.
MAX_CLASSES = 1000


# --------------------------------------------------------------------------- config
@dataclass
class ScanConfig:
    """The `scan:` options of a YAML config; a `scenario:` section sets the recipe of the model trained here."""

    detectors: list[PluginSpec] = field(default_factory=list)
    expected_fraction: float = bounded(0.01, gt=0, max=0.49, help="expected poison fraction ε")
    influence: dict = field(default_factory=dict, metadata={
        "help": "IHVP backend and its settings (default: ekfac, damping 1e-3; fit_size: fit on a seeded sample; "
                "backend projected with rank, damping (a number or auto) for self-influence and probes at scale)"})
    bootstrap: int = bounded(1000, min=0, help="bootstrap resamples for the CIs (0: none)")
    features_layer: str | None = field(default=None, metadata={
        "help": "module whose output the feature detectors read, e.g. layer4 (default: the input of the last "
                "nn.Linear, or the model's features()/head)"})
    attacks: list[str] = field(default_factory=list, metadata={
        "help": "bench: the attacks whose poisoned sets are scanned and defended against (default: every one)"})

    def validate(self, source: str, prefix: str) -> None:
        from .detectors.base import influence_problem

        problem = influence_problem(self.influence)
        if problem is not None:
            raise ConfigError(source, f"{prefix}.influence", *problem)


@dataclass
class ScanFileConfig:
    scenario: ScenarioConfig | None = None
    scan: ScanConfig = field(default_factory=ScanConfig)


def default_scenario(data: ImageDataset) -> ScenarioConfig:
    """The digits recipe for 8x8 greyscale data, else the paper's TinyResNet recipe."""
    if data.input_shape == (1, 8, 8):
        return ScenarioConfig(model=PluginSpec("digits-cnn"),
                              train=TrainConfig(lr=0.05, batch_size=16, epochs=10, seed=0, order="fixed"))
    return ScenarioConfig(model=PluginSpec("tiny-resnet"),
                          train=TrainConfig(lr=0.01, batch_size=16, epochs=10, seed=0, order="fixed"))


# --------------------------------------------------------------------------- the model
def train_on_suspect(data: ImageDataset, scenario: ScenarioConfig, cache: Path | None = None,
                     progress: bool = True, features_layer: str | None = None) -> tuple[Any, dict]:
    """A model trained on the suspect data by the scenario's pipeline (its recipe, or a user's own pipeline with
    its own training), reused from `cache` if it matches; a `features_layer` the model lacks fails before any
    training."""
    from .data import DatasetSplit
    from .detectors import FeatureExtractor
    from .pipeline import Pipeline
    from .training import Checkpoint, accuracy

    pipeline = Pipeline.from_config(scenario, data=DatasetSplit(data, data))
    key = stable_hash({"pipeline": pipeline.fingerprint()})
    model = pipeline.new_model()
    FeatureExtractor(model, features_layer)
    if cache is not None and verified(cache):
        ckpt = Checkpoint.load(cache)
        if ckpt.meta.get("key") == key:
            model.load_state_dict(ckpt.model)
            log.info("reusing the model trained on this data: %s", cache)
            return model.to(pipeline.train_cfg.device).eval(), dict(ckpt.meta["info"], reused=True)
    t0 = time.perf_counter()
    pipeline.fit(model, data, progress=progress)
    info = {"source": "trained", "model": to_dict(scenario.model), "train": to_dict(scenario.train),
            **({"pipeline": scenario.pipeline.name} if scenario.pipeline is not None else {}),
            "train_seconds": round(time.perf_counter() - t0, 3), "train_accuracy": accuracy(model, data)}
    if cache is not None:
        Checkpoint.capture(scenario.train.epochs, model, None, {"key": key, "info": info}).save(cache)
        record_hash(cache)
        info["checkpoint"] = str(cache)
    return model.eval(), info


def load_model(path: str | Path, data: ImageDataset, scenario: ScenarioConfig) -> tuple[Any, dict]:
    """A user's checkpoint (loaded with weights_only=True) into the scenario's architecture."""
    from .models import build_model
    from .training import Checkpoint

    ckpt = Checkpoint.load(path)
    model = build_model(scenario.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    try:
        model.load_state_dict(ckpt.model)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise DataError(f"{path}: does not fit model {scenario.model.name!r} for {data.input_shape} inputs and "
                        f"{data.num_classes} classes ({first}); name the architecture with --config") from None
    info = {"source": "checkpoint", "checkpoint": str(path), "model": to_dict(scenario.model)}
    return model.to(resolve_device(scenario.train.device)).eval(), info


# --------------------------------------------------------------------------- scanning
def detector_label(spec: PluginSpec) -> str:
    """Column-safe name of a detector configuration: the name, plus its parameters if it has any."""
    if not spec.params:
        return spec.name
    return spec.name + "(" + ";".join(f"{k}={v}" for k, v in sorted(spec.params.items())) + ")"


@dataclass(repr=False)
class ScanResult:
    """Every detector's verdict on one dataset: `scores`, `ranks` and `flagged` (detector -> one value per
    document), `skipped` (detector -> why it did not run), `suspects(n)` (the most suspicious documents),
    `to_csv()`, `write_report(path)`, and a short summary when displayed in Jupyter."""

    context: Any
    runs: list  # DetectorRun, in the order asked
    labels: list[str]
    truth: np.ndarray | None = None
    detection: dict = field(default_factory=dict)  # label -> detection record
    info: dict = field(default_factory=dict)  # what was scanned (data, model): goes into the summary

    @property
    def completed(self) -> list[tuple[str, Any]]:
        return [(lab, r) for lab, r in zip(self.labels, self.runs) if r.skipped is None]

    @property
    def scores(self) -> dict[str, np.ndarray]:
        """Detector -> suspicion score of every document (higher = more suspicious), for the detectors that ran."""
        return {lab: r.scores for lab, r in self.completed}

    @property
    def ranks(self) -> dict[str, np.ndarray]:
        """Detector -> rank of every document, 1 = most suspicious (ties share the best rank)."""
        return {lab: rankdata(-r.scores, method="min").astype(int) for lab, r in self.completed}

    @property
    def flagged(self) -> dict[str, np.ndarray]:
        """Detector -> True for every document its flag rule removes."""
        return {lab: r.flagged for lab, r in self.completed}

    @property
    def skipped(self) -> dict[str, str]:
        """Detector -> why it did not run: what it needs, or how it failed."""
        return {lab: r.skipped for lab, r in zip(self.labels, self.runs) if r.skipped is not None}

    def suspects(self, n: int | None = 20, detector: str | None = None) -> np.ndarray:
        """Indices of the `n` most suspicious documents (None: all), most suspicious first: by one detector's
        rank, or by the best rank any detector gives a document (the order of the HTML report)."""
        if n is not None and (not isinstance(n, (int, np.integer)) or n < 0):
            raise UserError(f"suspects: n must be a whole number >= 0 or None, got {n!r}")
        ranks = self.ranks
        if detector is not None and detector not in ranks:
            raise UserError(f"suspects: no scores from detector {detector!r}; scored: {', '.join(ranks) or 'none'}")
        if not ranks:
            return np.zeros(0, dtype=np.int64)
        best = ranks[detector] if detector is not None else np.min(list(ranks.values()), axis=0)
        return np.argsort(best, kind="stable")[:n]

    def to_csv(self, path: str | Path | None = None) -> str | Path:
        """index, label, [poisoned], then per detector score, rank (1 = most suspicious) and flag; then
        flagged_by and flagged. The CSV text, or with `path` written there atomically (returns the path)."""
        done, ranks, labels = self.completed, self.ranks, self.context.labels
        columns = ["index", "label"] + (["poisoned"] if self.truth is not None else [])
        for lab, _ in done:
            columns += [f"{lab}_score", f"{lab}_rank", f"{lab}_flagged"]
        columns += ["flagged_by", "flagged"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for i in range(len(self.context)):
            row: list[Any] = [i, int(labels[i])] + ([int(self.truth[i])] if self.truth is not None else [])
            votes = 0
            for lab, r in done:
                votes += int(r.flagged[i])
                row += [f"{r.scores[i]:.6g}", int(ranks[lab][i]), int(r.flagged[i])]
            row += [votes, int(votes > 0)]
            writer.writerow(row)
        return buf.getvalue() if path is None else atomic_write_text(path, buf.getvalue())

    def write_report(self, path: str | Path) -> Path:
        """Write the self-contained HTML page of this scan (the one `infusion-audit report` renders) to `path`."""
        from .reports.render import scan_report_html

        summary = json.loads(json.dumps(self.summary(), default=_jsonable))  # exactly what summary.json holds
        html_text = scan_report_html(self.to_csv(), summary, f"Dataset scan: {self.context.data.name}")
        return atomic_write_text(path, html_text)

    def summary(self, extra: dict | None = None) -> dict:
        ctx = self.context
        return {
            "kind": "scan",
            "version": __version__,
            **self.info,
            **(extra or {}),
            "n_documents": len(ctx),
            "expected_fraction": ctx.expected_fraction,
            "behaviour": ctx.behaviour.as_dict() if ctx.behaviour is not None else None,
            "detectors": [{"label": lab, "name": r.name, "params": r.params, "knowledge": r.knowledge,
                           "seconds": round(r.seconds, 4), "flagged": int(r.flagged.sum()),
                           "most_suspicious": np.argsort(-r.scores, kind="stable")[:20].tolist(),
                           "details": r.details} for lab, r in self.completed],
            "skipped": [{"label": lab, "name": r.name, "reason": r.skipped}
                        for lab, r in zip(self.labels, self.runs) if r.skipped is not None],
            "flagged_by_any": int(np.any([r.flagged for _, r in self.completed], axis=0).sum())
            if self.completed else 0,
            "context_seconds": {k: round(v, 4) for k, v in ctx.timings.items()},
            "columns": {
                "index": "document position in the dataset (0-based)", "label": "the document's label",
                "poisoned": "ground truth from the manifest (1 = poisoned)",
                "<detector>_score": "suspicion score, higher = more suspicious",
                "<detector>_rank": "1 = most suspicious document for that detector (ties share the best rank)",
                "<detector>_flagged": "1 if the detector's flag rule removes the document",
                "flagged_by": "how many detectors flagged the document", "flagged": "1 if any detector flagged it"},
            "detection": self.detection,
        }

    def _repr_html_(self) -> str:
        """For Jupyter: what ran and what it flagged, what was skipped and why, the top suspects; all escaped."""
        done, ranks, labels = self.completed, self.ranks, self.context.labels
        measured = self.truth is not None
        parts = [f"<p><strong>Scan of {len(self.context)} documents</strong> ({html.escape(self.context.data.name)})"
                 f": {len(done)} detectors ran, {len(self.skipped)} skipped.</p>"]
        if done:
            parts.append(_html_table(
                ["detector", "knowledge", "flagged"] + (["AUROC"] if measured else []) + ["seconds"],
                [[lab, r.knowledge, int(r.flagged.sum())]
                 + ([f"{self.detection[lab]['auroc']['value']:.3f}"] if measured else []) + [f"{r.seconds:.2f}"]
                 for lab, r in done]))
            top = self.suspects(10)
            parts.append("<p>Most suspicious documents (best rank over detectors):</p>")
            parts.append(_html_table(
                ["index", "label"] + (["poisoned"] if measured else []) + ["flagged by"] + [f"{lab} rank" for lab, _ in done],
                [[int(i), int(labels[i])] + ([int(self.truth[i])] if measured else [])
                 + [sum(int(r.flagged[i]) for _, r in done)] + [int(ranks[lab][i]) for lab, _ in done] for i in top]))
        if self.skipped:
            parts.append("<p>Skipped:</p><ul>" + "".join(f"<li>{html.escape(lab)}: {html.escape(reason)}</li>"
                                                         for lab, reason in self.skipped.items()) + "</ul>")
        return "<div>" + "".join(parts) + "</div>"

    def __repr__(self) -> str:
        return (f"ScanResult(n_documents={len(self.context)}, scored={[lab for lab, _ in self.completed]}, "
                f"skipped={list(self.skipped)})")


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    def cells(tag: str, values: list[Any]) -> str:
        return "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values)

    return ("<table><thead><tr>" + cells("th", header) + "</tr></thead><tbody>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</tbody></table>")


def scan(data: Any, y: Any = None, *, model: Any = None, detectors: str | Sequence[str | PluginSpec] | None = None,
         reference: Any = None, behaviour: Any = None, probe: Any = None,
         truth: Sequence[int] | np.ndarray | None = None, expected_fraction: float = 0.01,
         influence: dict | None = None, bootstrap: int = 1000, channels_last: bool | None = None,
         num_classes: int | None = None, features_layer: str | None = None, progress: bool = True) -> ScanResult:
    """Run detectors on one suspect dataset; with `truth` (poisoned indices or a boolean mask) measure them.

    `data` is image arrays `x` with labels `y` (numpy or torch; (N, C, H, W), (N, H, W, C) or greyscale
    (N, H, W); uint8 is scaled to [0, 1], float is kept as given), a map-style torch Dataset of
    (input, label) pairs (tensors, arrays or PIL images), an ImageDataset or TextDataset, or a path as
    the command line takes. The layout is read from the shape when exactly one of axes 1 and 3 holds
    1 or 3 channels; otherwise say it with `channels_last`. `num_classes`: default largest label + 1.

    `model`: any torch nn.Module trained on the data; it gets float32 (N, C, H, W) batches and is put in
    eval mode. Unlike the command line, a call never trains one: without a model, the detectors that
    need one are skipped, each with the reason in `result.skipped`. `reference`: a trusted copy of the
    same documents in the same order, in any form `data` takes or as arrays of inputs alone (the labels
    are the data's). `features_layer`: the module whose output detectors take as features (default: the
    model's features(), else the input of its last nn.Linear). `behaviour`: the suspicious prediction, a
    ClassBehaviour or an (input, class) pair.
    `probe`: held-out inputs for influence probes (a dataset or a path). `detectors`: names (a list,
    or "a,b") or PluginSpecs; default: every registered detector that scores this kind of data. A
    detector that cannot run or fails is reported in the result, not raised.

    Anything unusable (a bad shape, NaNs, non-integer labels, a model that cannot take the inputs, an
    unknown detector) raises UserError (its subclass DataError for data) with a one-line message.
    """
    from .detectors import audit_context, build_detector, run_detector
    from .registry import DETECTORS

    data = as_dataset(data, y, channels_last=channels_last, num_classes=num_classes, progress=progress)
    if reference is not None:
        labels = data.y if isinstance(reference, (np.ndarray, torch.Tensor)) and hasattr(data, "y") else None
        reference = as_dataset(reference, labels, channels_last=channels_last, num_classes=getattr(
            data, "num_classes", None), what="reference", progress=progress)
    if probe is not None:
        probe = as_dataset(probe, channels_last=channels_last, num_classes=getattr(data, "num_classes", None),
                           what="probe", progress=progress)
        if probe.input_shape != data.input_shape:
            raise DataError(f"probe: inputs of shape {probe.input_shape}, the data's are {data.input_shape}")
    behaviour = as_behaviour(behaviour, data)
    if model is not None:
        check_model(model, data)
    if isinstance(detectors, str):
        detectors = [name.strip() for name in detectors.split(",") if name.strip()]
    if detectors:
        specs = [PluginSpec(d) if isinstance(d, str) else d for d in detectors]
    else:  # every registered detector that scores this kind of data
        specs = [PluginSpec(n) for n in DETECTORS.names() if build_detector(n).applies_to(data)]
    built = [build_detector(s.name, s.params) for s in specs]  # bad names and params fail before any work
    labels = [detector_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"the same detector configuration is listed twice: {labels}")
    options = dict(reference=reference, behaviour=behaviour, probe=probe, expected_fraction=expected_fraction,
                   features_layer=features_layer, progress=progress,
                   **({"influence": dict(influence)} if influence else {}))
    context = audit_context(data, model, **options)
    runs = []
    for label, detector in zip(labels, built):
        log.info("running %s", label)
        runs.append(run_detector(detector, context))
    info = {"data": {"name": data.name, "kind": data.kind, "n": len(data)}}
    if data.kind == "image":
        info["data"].update(shape=list(data.input_shape), num_classes=data.num_classes, class_names=data.class_names)
    if model is not None:
        info["model"] = {"source": "python", "class": type(model).__name__}
    result = ScanResult(context, runs, labels, info=info)
    if truth is not None:
        result.truth = truth_mask(truth, len(data))
        result.detection = {label: evaluate_run(run, result.truth, context.labels, bootstrap)
                            for label, run in result.completed}
    return result


# --------------------------------------------------------------------------- what scan() accepts
GREY_OR_RGB = (1, 3)  # channel counts that tell an image layout from its shape


def as_dataset(data: Any, y: Any = None, *, channels_last: bool | None = None, num_classes: int | None = None,
               what: str = "data", progress: bool = False) -> Any:
    """What `scan` accepts as documents (see its docstring), as an ImageDataset or the TextDataset given,
    checked as the command line checks a file."""
    if isinstance(data, (str, Path)) or (hasattr(data, "kind") and hasattr(data, "batch")):
        if y is not None:
            raise UserError(f"{what}: labels come with the dataset; pass y only with image arrays")
        if isinstance(data, (str, Path)):
            return checked_suspect(data, num_classes, what)
        return check_suspect(data, num_classes, data.name, what)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if y is None:
            raise UserError(f"{what}: image arrays need their labels, scan(x, y, ...)")
        name, x, labels = f"{what} arrays", _numpy(data, what), _numpy(y, f"{what} labels")
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__getitem__"):
        if y is not None:
            raise UserError(f"{what}: labels come with the dataset; pass y only with image arrays")
        name = f"{what} ({type(data).__name__})"
        x, labels = _from_torch_dataset(data, name, progress)
    else:
        raise UserError(f"{what}: expected image arrays x and y, a map-style torch Dataset of (input, label) pairs, "
                        f"an ImageDataset or TextDataset, or a path; got {type(data).__name__}")
    images = images_from_arrays(_channels_first(x, channels_last, name), labels, name=name, num_classes=num_classes)
    return check_suspect(images, num_classes, name, what)


def _numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{name}: not an array ({str(exc).splitlines()[0][:120]})") from None


def _channels_first(x: np.ndarray, channels_last: bool | None, name: str) -> np.ndarray:
    """(N, H, W, C) images as (N, C, H, W); anything but 4 axes is left to the shape check."""
    if x.ndim != 4:
        return x
    if channels_last is None:
        first, last = x.shape[1] in GREY_OR_RGB, x.shape[3] in GREY_OR_RGB
        if first == last:
            raise DataError(f"{name}: cannot tell whether images of shape {x.shape} are (N, C, H, W) or "
                            "(N, H, W, C); pass channels_last=False or True")
        channels_last = last
    return x.transpose(0, 3, 1, 2) if channels_last else x


def _from_torch_dataset(dataset: Any, name: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, label) item of a map-style dataset, inputs stacked (one shape and dtype for all)."""
    try:
        n = len(dataset)
    except TypeError:
        raise UserError(f"{name}: has no length; scan needs a map-style Dataset (items 0..N-1)") from None
    if n == 0:
        raise DataError(f"{name}: the dataset is empty")
    x, labels = None, []
    for i in tqdm(range(n), desc="reading dataset", unit="doc", disable=not progress, leave=False):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{name}: item {i} is a {type(item).__name__}, expected an (input, label) pair")
        inp, label = _numpy(item[0], f"{name} item {i}"), _numpy(item[1], f"{name} item {i} label")
        if x is None:
            x = np.empty((n, *inp.shape), dtype=inp.dtype)
        if inp.shape != x.shape[1:] or inp.dtype != x.dtype:
            raise DataError(f"{name}: item {i} has an input of shape {inp.shape} and dtype {inp.dtype}, item 0 "
                            f"{x.shape[1:]} and {x.dtype}; every input must be alike")
        if label.size != 1:
            raise DataError(f"{name}: item {i} has a label of shape {label.shape}, expected one class number")
        x[i] = inp
        labels.append(label.reshape(()))
    return x, np.stack(labels)


def as_behaviour(behaviour: Any, data: Any) -> Any:
    """A ClassBehaviour from an (input, class) pair; an image behaviour is checked against the data."""
    from .behaviour import ClassBehaviour

    if behaviour is None or data.kind != "image":
        return behaviour
    if not isinstance(behaviour, ClassBehaviour):
        try:
            x, cls = behaviour
            x, cls = _numpy(x, "behaviour input"), int(cls)
        except (TypeError, ValueError):
            raise UserError("behaviour: expected a ClassBehaviour or an (input, class) pair") from None
        x = unit_float_images(x, "behaviour input")[0]
        behaviour = ClassBehaviour(x.reshape(data.input_shape) if x.ndim == 2 and data.input_shape[0] == 1 else x, cls,
                              f"an input classified as {cls}")
    if tuple(np.shape(behaviour.x)) != data.input_shape or not np.isfinite(behaviour.x).all():
        raise DataError(f"behaviour: input has shape {tuple(np.shape(behaviour.x))}, the data's documents "
                        f"{data.input_shape} (and must be finite)")
    if not 0 <= behaviour.cls < data.num_classes:
        raise DataError(f"behaviour: class {behaviour.cls} is not one of the data's {data.num_classes} classes")
    return behaviour


def check_model(model: Any, data: Any) -> None:
    """A torch module that takes two of the data's images and returns one logit per class, or one line why not."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected a torch nn.Module trained on the data, got {type(model).__name__}")
    if data.kind != "image":
        return
    x, _ = data.batch(np.arange(2), model_device(model))
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure here is the model not fitting the data
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DataError(f"model {type(model).__name__} cannot take the data's images, float32 batches of shape "
                        f"(N, {', '.join(map(str, data.input_shape))}): {type(exc).__name__}: {first}") from None
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < data.num_classes:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"model {type(model).__name__} returned {got} for 2 images; expected logits of shape "
                        f"(2, {data.num_classes}), one per class")


def truth_mask(truth: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
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


def evaluate_run(run: Any, truth: np.ndarray, labels: np.ndarray | None = None, bootstrap: int = 1000) -> dict:
    """The detection-record fields for one detector run: metrics with CIs, plus detector, knowledge, seconds."""
    record = {"detector": run.name, "params": run.params, "knowledge": run.knowledge,
              "seconds": round(run.seconds, 4)}
    record.update(detection_metrics(truth, run.scores, run.flagged, labels=labels, n_boot=bootstrap))
    return record


# --------------------------------------------------------------------------- command line
BEHAVIOUR_FORMAT = "FILE[:INDEX]:CLASS (an image file .png/.npy, or an .npz whose x[INDEX] is the input)"


def parse_behaviour(spec: str, like: ImageDataset) -> Any:
    """`FILE[:INDEX]:CLASS` -> ClassBehaviour: the input a suspicious prediction was made on, and its class."""
    from .behaviour import ClassBehaviour

    m = re.fullmatch(r"(.+?)(?::(\d+))?:(\d+)", spec)
    if not m:
        raise UserError(f"--behaviour {spec!r}: expected {BEHAVIOUR_FORMAT}")
    path, index, cls = Path(m.group(1)), m.group(2), int(m.group(3))
    if cls >= like.num_classes:
        raise UserError(f"--behaviour {spec!r}: class {cls} is not one of the data's {like.num_classes} classes")
    if path.suffix == ".npy":
        x = unit_float_images(read_npy(path), str(path))[0]
    elif path.suffix == ".png":
        png_shape(path)
        x = read_png(path, like.input_shape[0]).astype(np.float32) / 255.0
    else:  # a behaviour needs no labels: an .npz need hold only x
        holder = unit_float_images(read_npz(path, ("x",))["x"], str(path))[0] if path.is_file() \
            else load_suspect(path).x
        if holder.ndim not in (3, 4):
            raise DataError(f"{path}: x must have shape (N, C, H, W) or (N, H, W), got {holder.shape}")
        i = int(index or 0)
        if i >= len(holder):
            raise UserError(f"--behaviour {spec!r}: index {i} is outside {path} ({len(holder)} documents)")
        x = holder[i]
    x = x.reshape(x.shape[-3:]) if x.ndim >= 3 else x[None]
    if tuple(x.shape) != like.input_shape or not np.isfinite(x).all():
        raise DataError(f"--behaviour {spec!r}: input has shape {tuple(x.shape)}, the data's documents "
                        f"{like.input_shape} (and must be finite)")
    return ClassBehaviour(x, cls, f"{path.name}{'[' + index + ']' if index else ''} classified as {cls}")


def read_truth(path: str | Path, n: int) -> list[int]:
    manifest = read_manifest(path)
    if manifest.get("n_documents", n) != n:
        raise DataError(f"{path}: manifest describes {manifest['n_documents']} documents, the data has {n}")
    indices = manifest["poisoned_indices"]
    if not all(isinstance(i, int) and 0 <= i < n for i in indices):
        raise DataError(f"{path}: poisoned_indices must be document positions in 0..{n - 1}")
    return indices


def checked_suspect(path: str | Path, num_classes: int | None, what: str = "data") -> ImageDataset:
    return check_suspect(load_suspect(path), num_classes, str(path), what)


def check_suspect(data: Any, num_classes: int | None, name: str, what: str = "data") -> Any:
    """A dataset to scan: image labels within `num_classes` (which it then takes), a plausible number of
    classes otherwise, and at least 2 documents."""
    if data.kind == "image" and num_classes is not None and num_classes != data.num_classes:
        if int(data.y.max()) >= num_classes:
            raise DataError(f"{name}: labels must lie in 0..{num_classes - 1}, found up to {int(data.y.max())}")
        names = data.class_names if len(data.class_names) == num_classes else []
        data = dataclasses.replace(data, num_classes=num_classes, class_names=names)
    elif data.kind == "image" and data.num_classes > MAX_CLASSES:
        raise DataError(f"{name}: labels reach {data.num_classes - 1}; more than {MAX_CLASSES} classes looks "
                        f"like corrupt labels (pass num_classes / --num-classes if they are real)")
    if len(data) < 2:
        raise DataError(f"{name}: {what} holds {len(data)} document; a scan needs at least 2")
    return data


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="suspect dataset: an .npz (x, y), a folder of PNGs per class, or a CIFAR-10 folder")
    p.add_argument("--out", required=True, type=Path,
                   help="directory for scores.csv, summary.json, detection.jsonl and report.html")
    p.add_argument("--reference", help="a trusted copy of the same documents in the same order")
    p.add_argument("--model", help="checkpoint of a model trained on DATA (loaded with weights_only=True); "
                                   "default: train one with the scenario's recipe")
    p.add_argument("--behaviour", help=f"the suspicious prediction, {BEHAVIOUR_FORMAT}")
    p.add_argument("--probe", help="held-out inputs (.npz/folder) for influence probes; default: a sample of DATA")
    p.add_argument("--detectors", help="comma-separated detector names (default: all; see `plugins`)")
    p.add_argument("--ground-truth", help="manifest.json listing the poisoned documents: adds detection figures")
    p.add_argument("--expected-fraction", type=float, help="expected poison fraction ε for removal budgets "
                                                            "(default 0.01)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: largest label + 1)")
    p.add_argument("--config", help="YAML with a `scenario:` section (model + recipe) and a `scan:` section")
    p.add_argument("--no-report", action="store_true", help="skip rendering report.html")


def run_scan(args: argparse.Namespace) -> int:
    cfg = ScanFileConfig()
    if args.config:
        cfg = load_config(ScanFileConfig, args.config)
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError("--num-classes must be >= 1")
    data = checked_suspect(args.data, args.num_classes)
    reference = checked_suspect(args.reference, data.num_classes, "reference") if args.reference else None
    probe = checked_suspect(args.probe, data.num_classes, "probe") if args.probe else None
    if probe is not None and probe.input_shape != data.input_shape:
        raise DataError(f"{args.probe}: inputs of shape {probe.input_shape}, the data's are {data.input_shape}")
    eps = args.expected_fraction if args.expected_fraction is not None else cfg.scan.expected_fraction
    if not 0 < eps < 0.5:
        raise UserError(f"--expected-fraction must lie in (0, 0.5), got {eps}")
    specs = cfg.scan.detectors or None
    if args.detectors:
        specs = [PluginSpec(name.strip()) for name in args.detectors.split(",") if name.strip()]
    truth = read_truth(args.ground_truth, len(data)) if args.ground_truth else None
    behaviour = parse_behaviour(args.behaviour, data) if args.behaviour else None
    scenario = (cfg.scenario or default_scenario(data)).on_device(getattr(args, "device", None))
    progress = not getattr(args, "quiet", False)
    model, model_info = None, None
    if args.model:
        model, model_info = load_model(args.model, data, scenario)
    with run_lock(args.out):  # one writer per run directory
        if model is None and _needs_a_model(specs):
            model, model_info = train_on_suspect(data, scenario, args.out / "model.pt", progress=progress,
                                                 features_layer=cfg.scan.features_layer)
        result = scan(data, detectors=specs, model=model, reference=reference, behaviour=behaviour, probe=probe,
                      truth=truth, expected_fraction=eps, influence=cfg.scan.influence,
                      bootstrap=cfg.scan.bootstrap, progress=progress, features_layer=cfg.scan.features_layer)
        write_scan(args.out, result, {
            "data": _describe(data, args.data), "reference": _describe(reference, args.reference),
            "probe": _describe(probe, args.probe), "model": model_info,
            "ground_truth": {"manifest": str(args.ground_truth), "n_poison": len(truth)} if truth is not None
            else None})
        report = None
        if not args.no_report:
            from .reports import render_scan_report

            report = render_scan_report(args.out)
    _print_summary(result, args.out, report)
    return 0


def _needs_a_model(specs: list[PluginSpec] | None) -> bool:
    """Whether any detector asked for reads a model (only then is one trained)."""
    from .detectors.base import MODEL_NEEDS, build_detector
    from .registry import DETECTORS

    specs = specs or [PluginSpec(n) for n in DETECTORS.names()]
    return any(build_detector(s.name, s.params).required() & MODEL_NEEDS for s in specs)


def write_scan(out: Path, result: ScanResult, extra: dict) -> None:
    result.to_csv(out / "scores.csv")
    write_json(out / "summary.json", result.summary(extra))
    if result.detection:
        lines = [{"kind": "detection", **record} for record in result.detection.values()]
        atomic_write_text(out / "detection.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))


def _describe(ds: ImageDataset | None, path: str | None) -> dict | None:
    if ds is None:
        return None
    return {"path": str(path), "n": len(ds), "shape": list(ds.input_shape), "num_classes": ds.num_classes,
            "class_names": ds.class_names, "grid": ds.grid, "value_range": list(ds.value_range),
            "content_hash": ds.content_hash()}


def _print_summary(result: ScanResult, out: Path, report: Path | None = None) -> None:
    from .stats import fmt_ci

    for label, run in result.completed:
        line = f"{label:<28} [{run.knowledge}] flagged {int(run.flagged.sum()):>5}  {run.seconds:7.2f}s"
        record = result.detection.get(label)
        if record:
            line += f"  AUROC {fmt_ci(record['auroc'])}  recall@k {record['recall_at_k']['value']:.3f}"
        print(line)
    for label, run in zip(result.labels, result.runs):
        if run.skipped:
            print(f"{label:<28} skipped: {run.skipped}")
    print(f"wrote {out / 'scores.csv'} and {out / 'summary.json'}" + (f"; report: {report}" if report else ""))
