"""`infusion-audit scan`: score every document of a suspect dataset file, write scores.csv, summary.json and
report.html. Unlike `scan()` from Python, the command trains a model on the data when a detector needs one
and none is given (by the config's pipeline, else a recipe for the data's shape)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import PluginSpec, load_config
from ..data import ImageDataset
from ..detectors.base import MODEL_NEEDS, build_detector
from ..errors import DataError, UserError
from ..io import atomic_write_text, run_lock, write_json
from ..registry import DETECTORS
from ..scan.api import ScanResult, default_pipeline, load_model, scan, train_on_suspect
from ..scan.inputs import BEHAVIOUR_FORMAT, checked_suspect, parse_behaviour, read_truth
from ..statistics import fmt_ci


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="suspect dataset: an .npz (x, y), a folder of PNGs per class, or a CIFAR-10 folder")
    p.add_argument("--out", required=True, type=Path,
                   help="directory for scores.csv, summary.json, detection.jsonl and report.html")
    p.add_argument("--reference", help="a trusted copy of the same documents in the same order")
    p.add_argument("--model", help="checkpoint of a model trained on DATA (loaded with weights_only=True); "
                                   "default: train one by the config's pipeline")
    p.add_argument("--behaviour", help=f"the suspicious prediction, {BEHAVIOUR_FORMAT}")
    p.add_argument("--probe", help="held-out inputs (.npz/folder) for influence probes; default: a sample of DATA")
    p.add_argument("--detectors", help="comma-separated detector names (default: all; see `plugins`)")
    p.add_argument("--ground-truth", help="manifest.json listing the poisoned documents: adds detection figures")
    p.add_argument("--expected-fraction", type=float, help="expected poison fraction ε for removal budgets "
                                                            "(default 0.01)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: largest label + 1)")
    p.add_argument("--config", help="YAML with a `pipeline:` section (model + recipe), and `scan:` and `influence:` "
                                    "sections")
    p.add_argument("--no-report", action="store_true", help="skip rendering report.html")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config or {})
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
    pipeline = (cfg.pipeline or default_pipeline(data)).on_device(args.device)
    progress = not getattr(args, "quiet", False)
    model, model_info = None, None
    if args.model:
        model, model_info = load_model(args.model, data, pipeline)
    with run_lock(args.out):  # one writer per run directory
        if model is None and _needs_a_model(specs):
            model, model_info = train_on_suspect(data, pipeline, args.out / "model.pt", progress=progress,
                                                 features_layer=cfg.scan.features_layer)
        result = scan(data, detectors=specs, model=model, reference=reference, behaviour=behaviour, probe=probe,
                      truth=truth, expected_fraction=eps, influence=cfg.influence,
                      bootstrap=cfg.scan.bootstrap, progress=progress, features_layer=cfg.scan.features_layer)
        write_scan(args.out, result, {
            "data": _describe(data, args.data), "reference": _describe(reference, args.reference),
            "probe": _describe(probe, args.probe), "model": model_info,
            "ground_truth": {"manifest": str(args.ground_truth), "n_poison": len(truth)} if truth is not None
            else None})
        report = None
        if not args.no_report:
            from ..reports import render_scan_report

            report = render_scan_report(args.out)
    _print_summary(result, args.out, report)
    return 0


def _needs_a_model(specs: list[PluginSpec] | None) -> bool:
    """Whether any detector asked for reads a model (only then is one trained)."""
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
