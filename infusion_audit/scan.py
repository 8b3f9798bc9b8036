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
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from . import __version__
from .config import PluginSpec, ScenarioConfig, TrainConfig, bounded, load_config, to_dict
from .data import ImageDataset, load_suspect, read_manifest
from .errors import DataError, UserError
from .io import atomic_write_text, stable_hash, write_json
from .metrics import detection_metrics

log = logging.getLogger(__name__)

# Above this many classes the labels are more likely garbage than a real label set.
MAX_CLASSES = 1000


# --------------------------------------------------------------------------- config
@dataclass
class ScanConfig:
    """The `scan:` options of a YAML config; a `scenario:` section sets the recipe of the model trained here."""

    detectors: list[PluginSpec] = field(default_factory=list)
    expected_fraction: float = bounded(0.01, gt=0, max=0.49, help="expected poison fraction ε")
    influence: dict = field(default_factory=dict,
                            metadata={"help": "IHVP backend and damping (default: ekfac, damping 1e-3)"})
    bootstrap: int = bounded(1000, min=0, help="bootstrap resamples for the CIs (0: none)")


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
                     progress: bool = True) -> tuple[Any, dict]:
    """A model trained on the suspect data with the scenario's recipe (reused from `cache` if it matches)."""
    from .models import build_model
    from .training import Checkpoint, accuracy, seeded_model, train

    key = stable_hash({"scenario": to_dict(scenario), "data": data.content_hash()})
    factory = lambda: build_model(scenario.model, in_channels=data.input_shape[0],  # noqa: E731
                                      num_classes=data.num_classes)
    model = seeded_model(factory, scenario.train.seed)
    if cache is not None and cache.exists():
        ckpt = Checkpoint.load(cache)
        if ckpt.meta.get("key") == key:
            model.load_state_dict(ckpt.model)
            log.info("reusing the model trained on this data: %s", cache)
            return model.eval(), dict(ckpt.meta["info"], reused=True)
    t0 = time.perf_counter()
    train(model, data, scenario.train, progress=progress)
    info = {"source": "trained", "model": to_dict(scenario.model), "train": to_dict(scenario.train),
            "train_seconds": round(time.perf_counter() - t0, 3), "train_accuracy": accuracy(model, data)}
    if cache is not None:
        Checkpoint.capture(scenario.train.epochs, model, None, {"key": key, "info": info}).save(cache)
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
    return model.eval(), {"source": "checkpoint", "checkpoint": str(path), "model": to_dict(scenario.model)}


# --------------------------------------------------------------------------- scanning
def detector_label(spec: PluginSpec) -> str:
    """Column-safe name of a detector configuration: the name, plus its parameters if it has any."""
    if not spec.params:
        return spec.name
    return spec.name + "(" + ";".join(f"{k}={v}" for k, v in sorted(spec.params.items())) + ")"


@dataclass
class ScanResult:
    context: Any
    runs: list  # DetectorRun, in the order asked
    labels: list[str]
    truth: np.ndarray | None = None
    detection: dict = field(default_factory=dict)  # label -> detection record

    @property
    def completed(self) -> list[tuple[str, Any]]:
        return [(lab, r) for lab, r in zip(self.labels, self.runs) if r.skipped is None]

    def scores_csv(self) -> str:
        """index, label, [poisoned], then per detector score, rank (1 = most suspicious) and flag; then flagged."""
        ctx = self.context
        done = self.completed
        columns = ["index", "label"] + (["poisoned"] if self.truth is not None else [])
        for lab, _ in done:
            columns += [f"{lab}_score", f"{lab}_rank", f"{lab}_flagged"]
        columns += ["flagged_by", "flagged"]
        ranks = {lab: rankdata(-r.scores, method="min").astype(int) for lab, r in done}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        labels = ctx.labels
        for i in range(len(ctx)):
            row: list[Any] = [i, int(labels[i])] + ([int(self.truth[i])] if self.truth is not None else [])
            votes = 0
            for lab, r in done:
                votes += int(r.flagged[i])
                row += [f"{r.scores[i]:.6g}", int(ranks[lab][i]), int(r.flagged[i])]
            row += [votes, int(votes > 0)]
            writer.writerow(row)
        return buf.getvalue()

    def summary(self, extra: dict | None = None) -> dict:
        ctx = self.context
        return {
            "kind": "scan",
            "version": __version__,
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


def scan(data: ImageDataset, *, detectors: Sequence[str | PluginSpec] | None = None, model: Any = None,
         reference: ImageDataset | None = None, behaviour: Any = None, probe: Any = None,
         truth: Sequence[int] | np.ndarray | None = None, expected_fraction: float = 0.01,
         influence: dict | None = None, bootstrap: int = 1000, progress: bool = True) -> ScanResult:
    """Run detectors on one suspect dataset; with `truth` (poisoned indices or a boolean mask) measure them.

    `detectors`: names or PluginSpecs (default: every registered detector that scores this kind of data,
    with its defaults). A detector that cannot run or fails is reported in the result, not raised.
    """
    from .detectors import AuditContext, build_detector, run_detector
    from .registry import DETECTORS

    if detectors:
        specs = [PluginSpec(d) if isinstance(d, str) else d for d in detectors]
    else:  # every registered detector that scores this kind of data
        specs = [PluginSpec(n) for n in DETECTORS.names() if build_detector(n).applies_to(data)]
    built = [build_detector(s.name, s.params) for s in specs]  # bad names and params fail before any work
    labels = [detector_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"the same detector configuration is listed twice: {labels}")
    context = AuditContext(data, model=model, reference=reference, behaviour=behaviour, probe=probe,
                           expected_fraction=expected_fraction, progress=progress,
                           **({"influence": dict(influence)} if influence else {}))
    runs = []
    for label, detector in zip(labels, built):
        log.info("running %s", label)
        runs.append(run_detector(detector, context))
    result = ScanResult(context, runs, labels)
    if truth is not None:
        result.truth = truth_mask(truth, len(data))
        result.detection = {label: evaluate_run(run, result.truth, context.labels, bootstrap)
                            for label, run in result.completed}
    return result


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
    """`FILE[:INDEX]:CLASS` -> Behaviour: the input a suspicious prediction was made on, and its class."""
    from .detectors import Behaviour

    m = re.fullmatch(r"(.+?)(?::(\d+))?:(\d+)", spec)
    if not m:
        raise UserError(f"--behaviour {spec!r}: expected {BEHAVIOUR_FORMAT}")
    path, index, cls = Path(m.group(1)), m.group(2), int(m.group(3))
    if cls >= like.num_classes:
        raise UserError(f"--behaviour {spec!r}: class {cls} is not one of the data's {like.num_classes} classes")
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy ({type(exc).__name__})") from None
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    elif path.suffix == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if like.input_shape[0] == 1 else "RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable PNG ({type(exc).__name__})") from None
        x = (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).astype(np.float32) / 255.0
    else:
        holder = load_suspect(path)
        i = int(index or 0)
        if i >= len(holder):
            raise UserError(f"--behaviour {spec!r}: index {i} is outside {path} ({len(holder)} documents)")
        x = holder.x[i]
    x = x.reshape(x.shape[-3:]) if x.ndim >= 3 else x[None]
    if tuple(x.shape) != like.input_shape or not np.isfinite(x).all():
        raise DataError(f"--behaviour {spec!r}: input has shape {tuple(x.shape)}, the data's documents "
                        f"{like.input_shape} (and must be finite)")
    return Behaviour(x, cls, f"{path.name}{'[' + index + ']' if index else ''} classified as {cls}")


def read_truth(path: str | Path, n: int) -> list[int]:
    manifest = read_manifest(path)
    if manifest.get("n_documents", n) != n:
        raise DataError(f"{path}: manifest describes {manifest['n_documents']} documents, the data has {n}")
    indices = manifest["poisoned_indices"]
    if not all(isinstance(i, int) and 0 <= i < n for i in indices):
        raise DataError(f"{path}: poisoned_indices must be document positions in 0..{n - 1}")
    return indices


def checked_suspect(path: str | Path, num_classes: int | None, what: str = "data") -> ImageDataset:
    data = load_suspect(path)
    if num_classes is not None:
        if int(data.y.max()) >= num_classes:
            raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found up to {int(data.y.max())}")
        names = data.class_names if len(data.class_names) == num_classes else []
        data = dataclasses.replace(data, num_classes=num_classes, class_names=names)
    elif data.num_classes > MAX_CLASSES:
        raise DataError(f"{path}: labels reach {data.num_classes - 1}; more than {MAX_CLASSES} classes looks "
                        f"like corrupt labels (pass --num-classes if they are real)")
    if len(data) < 2:
        raise DataError(f"{path}: {what} holds {len(data)} document; a scan needs at least 2")
    return data


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="suspect dataset: an .npz (x, y), a folder of PNGs per class, or a CIFAR-10 folder")
    p.add_argument("--out", required=True, type=Path, help="directory for scores.csv, summary.json, detection.jsonl")
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
    scenario = cfg.scenario or default_scenario(data)
    progress = not getattr(args, "quiet", False)
    model, model_info = None, None
    if args.model:
        model, model_info = load_model(args.model, data, scenario)
    elif _needs_a_model(specs):
        model, model_info = train_on_suspect(data, scenario, args.out / "model.pt", progress=progress)
    result = scan(data, detectors=specs, model=model, reference=reference, behaviour=behaviour, probe=probe,
                  truth=truth, expected_fraction=eps, influence=cfg.scan.influence, bootstrap=cfg.scan.bootstrap,
                  progress=progress)
    write_scan(args.out, result, {
        "data": _describe(data, args.data), "reference": _describe(reference, args.reference),
        "probe": _describe(probe, args.probe), "model": model_info,
        "ground_truth": {"manifest": str(args.ground_truth), "n_poison": len(truth)} if truth is not None else None})
    _print_summary(result, args.out)
    return 0


def _needs_a_model(specs: list[PluginSpec] | None) -> bool:
    """Whether any detector asked for reads a model (only then is one trained)."""
    from .registry import DETECTORS

    names = [s.name for s in specs] if specs else DETECTORS.names()
    return any(DETECTORS.get(n).needs & {"model", "gradients"} for n in names)


def write_scan(out: Path, result: ScanResult, extra: dict) -> None:
    atomic_write_text(out / "scores.csv", result.scores_csv())
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


def _print_summary(result: ScanResult, out: Path) -> None:
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
    print(f"wrote {out / 'scores.csv'} and {out / 'summary.json'}")
