"""`infusion-audit scan`: score every document of a suspect dataset file (images, or a JSON-lines text corpus),
write scores.csv, summary.json and report.html. Unlike `scan()` from Python, the command trains a model on the
data when a detector needs one and none is given (by the config's pipeline, else a recipe for the data's
shape; a text corpus needs the config's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import PipelineConfig, PluginSpec, load_config
from ..data import build_dataset
from ..detectors.base import MODEL_NEEDS, build_detector
from ..errors import DataError, UserError
from ..io import atomic_write_text, run_lock, write_json
from ..registry import DETECTORS
from ..scan.api import ScanResult, default_pipeline, load_model, scan, train_on_suspect
from ..scan.inputs import BEHAVIOUR_FORMAT, as_behaviour, as_dataset, checked_suspect, parse_behaviour, read_truth
from ..text.models import model_positions
from ..statistics import fmt_ci

TEXT_BEHAVIOUR_FORMAT = "WORD_A:WORD_B (word B predicted where the model predicts word A)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="suspect dataset: an .npz (x, y), a folder of PNGs per class, a CIFAR-10 folder, "
                                "or a .jsonl text corpus ({\"text\": ...} per line)")
    p.add_argument("--out", required=True, type=Path,
                   help="directory for scores.csv, summary.json, detection.jsonl and report.html")
    p.add_argument("--reference", help="a trusted copy of the same documents in the same order")
    p.add_argument("--model", help="checkpoint of a model trained on DATA (loaded with weights_only=True), or for a "
                                   "text corpus a Hugging Face model folder (safetensors, with its tokenizer); "
                                   "default: train one by the config's pipeline")
    p.add_argument("--behaviour", help=f"the suspicious prediction, {BEHAVIOUR_FORMAT}; for a text corpus "
                                       f"{TEXT_BEHAVIOUR_FORMAT}")
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
    eps = args.expected_fraction if args.expected_fraction is not None else cfg.scan.expected_fraction
    if not 0 < eps < 0.5:
        raise UserError(f"--expected-fraction must lie in (0, 0.5), got {eps}")
    specs = cfg.scan.detectors or None
    if args.detectors:
        specs = [PluginSpec(name.strip()) for name in args.detectors.split(",") if name.strip()]
    text = Path(args.data).suffix == ".jsonl"
    data, reference, probe, behaviour = (_text_inputs if text else _image_inputs)(args, cfg)
    truth = read_truth(args.ground_truth, len(data)) if args.ground_truth else None
    # without a config, a text corpus came with its model folder: only the device is read from the recipe
    pipeline = (cfg.pipeline or (PipelineConfig() if text else default_pipeline(data))).on_device(args.device)
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
                      bootstrap=cfg.scan.bootstrap, progress=progress, features_layer=cfg.scan.features_layer,
                      caller="command line")
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


def _image_inputs(args: argparse.Namespace, cfg) -> tuple:
    """The suspect images, with the reference, probe and behaviour the flags name, each checked."""
    data = checked_suspect(args.data, args.num_classes)
    reference = checked_suspect(args.reference, data.num_classes, "reference") if args.reference else None
    probe = checked_suspect(args.probe, data.num_classes, "probe") if args.probe else None
    if probe is not None and probe.input_shape != data.input_shape:
        raise DataError(f"{args.probe}: inputs of shape {probe.input_shape}, the data's are {data.input_shape}")
    return data, reference, probe, parse_behaviour(args.behaviour, data) if args.behaviour else None


def _text_inputs(args: argparse.Namespace, cfg) -> tuple:
    """The suspect corpus tokenized as the model reads it: by the config's text dataset (its tokenizer and
    max_length), else by the --model folder's tokenizer; with the --reference corpus and a word-pair behaviour."""
    for flag, value in (("--probe", args.probe), ("--num-classes", args.num_classes)):
        if value is not None:
            raise UserError(f"{flag} is for image data; {args.data} is a text corpus")
    if cfg.pipeline is not None and cfg.pipeline.kind() == "text":
        like = build_dataset(cfg.pipeline.dataset).train
        tokenizer, max_length, positions = like.vocab, like.max_length, None
    elif args.model and Path(args.model).is_dir():
        tokenizer, max_length, positions = args.model, None, model_positions(PluginSpec("hf-local", {"path": args.model}))
    else:
        raise UserError(f"{args.data}: a text corpus is read by its model's tokenizer: give --model DIR (a Hugging "
                        "Face folder with its tokenizer) or --config with a text pipeline (e.g. pipeline.dataset "
                        "jsonl-text with params.tokenizer)")
    data = as_dataset(args.data, tokenizer=tokenizer, max_length=max_length, positions=positions)
    reference = as_dataset(args.reference, tokenizer=data.vocab, max_length=data.max_length, what="reference") \
        if args.reference else None
    if reference is not None and len(reference) != len(data):
        raise DataError(f"{args.reference}: {len(reference)} documents, {args.data} {len(data)}; a reference holds "
                        "the same documents in the same order")
    behaviour = None
    if args.behaviour:
        words = args.behaviour.split(":")
        if len(words) != 2 or not all(words):
            raise UserError(f"--behaviour {args.behaviour!r}: for a text corpus expected {TEXT_BEHAVIOUR_FORMAT}")
        behaviour = as_behaviour(tuple(words), data)
    return data, reference, None, behaviour


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


def _describe(ds, path: str | None) -> dict | None:
    if ds is None:
        return None
    if ds.kind == "text":
        return {"path": str(path), "kind": "text", "n": len(ds), "max_length": ds.max_length,
                "vocabulary": ds.vocab.size, "content_hash": ds.content_hash()}
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
