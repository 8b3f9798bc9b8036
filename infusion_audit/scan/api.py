"""`scan()`: rank every document of a suspect dataset by several independent detectors, from Python.

The defender brings the data (arrays, a torch Dataset, texts with their model's tokenizer, the project's
datasets, or a path as the command line takes) and whatever else they have: a trusted reference copy, a model trained on the data, the suspicious
behaviour, held-out probes, and, to measure the detectors, ground truth. The detectors run through the
detection engine (`detection.detect`), as every bench cell's do. The `scan` command (`cli.scan`) adds files:
it can train a model on the data by a pipeline (`train_on_suspect`) or load a checkpoint (`load_model`).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import InfluenceConfig, PipelineConfig, PluginSpec, TrainConfig, from_dict, to_dict
from ..data import DatasetSplit, ImageDataset
from ..detection import Detection, detect, detector_specs
from ..detectors import FeatureExtractor, audit_context
from ..errors import DataError, UserError
from ..io import _jsonable, atomic_write_text, record_hash, stable_hash, verified
from ..models import build_model
from ..pipeline import Pipeline
from ..runtime import configure, model_device, resolve_device
from ..text.data import tokens_changed
from ..text.models import build_text_model
from ..training import Checkpoint, accuracy
from ..version import __version__
from .inputs import as_behaviour, as_dataset, check_model

log = logging.getLogger(__name__)


def default_pipeline(data: ImageDataset) -> PipelineConfig:
    """The digits recipe for 8x8 greyscale data, else the paper's TinyResNet recipe."""
    if data.input_shape == (1, 8, 8):
        return PipelineConfig(model=PluginSpec("digits-cnn"),
                              train=TrainConfig(lr=0.05, batch_size=16, epochs=10, seed=0, order="fixed"))
    return PipelineConfig(model=PluginSpec("tiny-resnet"),
                          train=TrainConfig(lr=0.01, batch_size=16, epochs=10, seed=0, order="fixed"))


# --------------------------------------------------------------------------- the model
def train_on_suspect(data: ImageDataset, config: PipelineConfig, cache: Path | None = None,
                     progress: bool = True, features_layer: str | None = None) -> tuple[Any, dict]:
    """A model trained on the suspect data by the pipeline `config` describes (its recipe, or a user's own
    pipeline with its own training), reused from `cache` if it matches; a `features_layer` the model lacks fails
    before any training."""
    pipeline = Pipeline.from_config(config, data=DatasetSplit(data, data))
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
    fit = {"train_accuracy": accuracy(model, data)} if data.kind == "image" \
        else {"train_figures": pipeline.evaluate(model, data)}
    info = {"source": "trained", "model": to_dict(config.model), "train": to_dict(config.train),
            **({"pipeline": config.factory.name} if config.factory is not None else {}),
            "train_seconds": round(time.perf_counter() - t0, 3), **fit}
    if cache is not None:
        Checkpoint.capture(config.train.epochs, model, None, {"key": key, "info": info}).save(cache)
        record_hash(cache)
        info["checkpoint"] = str(cache)
    return model.eval(), info


def load_model(path: str | Path, data: Any, config: PipelineConfig) -> tuple[Any, dict]:
    """A user's checkpoint (loaded with weights_only=True) into the pipeline's architecture; for a text corpus
    also a Hugging Face model folder (safetensors), used as it is."""
    device = resolve_device(config.train.device)
    if data.kind == "text":
        if Path(path).is_dir():
            model = build_text_model(PluginSpec("hf-local", {"path": str(path)}), data.vocab.size, data.max_length)
            return model.to(device).eval(), {"source": "folder", "folder": str(path)}
        model = build_text_model(config.model, data.vocab.size, data.max_length)
        fits = f"model {config.model.name!r} for a vocabulary of {data.vocab.size} tokens"
    else:
        model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
        fits = f"model {config.model.name!r} for {data.input_shape} inputs and {data.num_classes} classes"
    ckpt = Checkpoint.load(path)
    try:
        model.load_state_dict(ckpt.model)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise DataError(f"{path}: does not fit {fits} ({first}); name the architecture with --config") from None
    info = {"source": "checkpoint", "checkpoint": str(path), "model": to_dict(config.model)}
    return model.to(device).eval(), info


# --------------------------------------------------------------------------- scanning
@dataclass(repr=False)
class ScanResult:
    """Every detector's verdict on one dataset: `scores`, `ranks` and `flagged` (detector -> one value per
    document), `skipped` (detector -> why it did not run), `suspects(n)` (the most suspicious documents),
    `to_csv()`, `write_report(path)`, and a short summary when displayed in Jupyter; with ground truth,
    `detection` (detector -> its detection figures with CIs) and `truth` (the poisoned mask)."""

    detected: Detection
    info: dict = field(default_factory=dict)  # what was scanned (data, model): goes into the summary

    @property
    def context(self):
        return self.detected.context

    @property
    def labels(self) -> list[str]:
        return self.detected.labels

    @property
    def runs(self) -> list:
        return self.detected.runs

    @property
    def truth(self) -> np.ndarray | None:
        return self.detected.truth

    @property
    def detection(self) -> dict:
        """Detector -> its detection figures (AUROC, AUPRC, TPR at 1% FPR, ... with CIs); empty without truth."""
        return self.detected.figures

    @property
    def completed(self) -> list[tuple[str, Any]]:
        return self.detected.completed

    @property
    def scores(self) -> dict[str, np.ndarray]:
        """Detector -> suspicion score of every document (higher = more suspicious), for the detectors that ran."""
        return {lab: r.scores for lab, r in self.completed}

    @property
    def ranks(self) -> dict[str, np.ndarray]:
        """Detector -> rank of every document, 1 = most suspicious (ties share the best rank)."""
        return self.detected.ranks

    @property
    def flagged(self) -> dict[str, np.ndarray]:
        """Detector -> True for every document its flag rule removes."""
        return {lab: r.flagged for lab, r in self.completed}

    @property
    def skipped(self) -> dict[str, str]:
        """Detector -> why it did not run: what it needs, or how it failed."""
        return self.detected.skipped

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

    def _document_columns(self) -> tuple[list[str], Callable[[int], list[Any]]]:
        """The columns that say which document a row is: its label (images), or its text and, where a trusted
        reference differs from it, the reference's text (text: the report marks the edits from them)."""
        ctx = self.context
        if ctx.data.kind != "text":
            labels = ctx.labels
            return ["label"], lambda i: [int(labels[i])]
        if ctx.reference is None:
            return ["text"], lambda i: [ctx.data.text(i)]
        changed = tokens_changed(ctx.reference, ctx.data) > 0
        return ["text", "reference"], lambda i: [ctx.data.text(i), ctx.reference.text(i) if changed[i] else ""]

    def to_csv(self, path: str | Path | None = None) -> str | Path:
        """index, label (text: the document's text, and with a reference its text where it differs), [poisoned],
        then per detector score, rank (1 = most suspicious) and flag; then flagged_by and flagged. The CSV text, or
        with `path` written there atomically (returns the path)."""
        done, ranks = self.completed, self.ranks
        names, document = self._document_columns()
        columns = ["index", *names] + (["poisoned"] if self.truth is not None else [])
        for lab, _ in done:
            columns += [f"{lab}_score", f"{lab}_rank", f"{lab}_flagged"]
        columns += ["flagged_by", "flagged"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for i in range(len(self.context)):
            row: list[Any] = [i, *document(i)] + ([int(self.truth[i])] if self.truth is not None else [])
            votes = 0
            for lab, r in done:
                votes += int(r.flagged[i])
                row += [f"{r.scores[i]:.6g}", int(ranks[lab][i]), int(r.flagged[i])]
            row += [votes, int(votes > 0)]
            writer.writerow(row)
        return buf.getvalue() if path is None else atomic_write_text(path, buf.getvalue())

    def write_report(self, path: str | Path) -> Path:
        """Write the self-contained HTML page of this scan (the one `infusion-audit report` renders) to `path`."""
        from ..reports.render import scan_report_html

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
                "text": "the document (text corpora)",
                "reference": "the trusted reference's text of the document, where it differs (text corpora)",
                "poisoned": "ground truth from the manifest (1 = poisoned)",
                "<detector>_score": "suspicion score, higher = more suspicious",
                "<detector>_rank": "1 = most suspicious document for that detector (ties share the best rank)",
                "<detector>_flagged": "1 if the detector's flag rule removes the document",
                "flagged_by": "how many detectors flagged the document", "flagged": "1 if any detector flagged it"},
            "detection": self.detection,
        }

    def _repr_html_(self) -> str:
        """For Jupyter: what ran and what it flagged, what was skipped and why, the top suspects; all escaped."""
        done, ranks = self.completed, self.ranks
        names, document = self._document_columns()
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
                ["index", *names[:1]] + (["poisoned"] if measured else []) + ["flagged by"]
                + [f"{lab} rank" for lab, _ in done],
                [[int(i), _shorten(document(i)[0])] + ([int(self.truth[i])] if measured else [])
                 + [sum(int(r.flagged[i]) for _, r in done)] + [int(ranks[lab][i]) for lab, _ in done] for i in top]))
        if self.skipped:
            parts.append("<p>Skipped:</p><ul>" + "".join(f"<li>{html.escape(lab)}: {html.escape(reason)}</li>"
                                                         for lab, reason in self.skipped.items()) + "</ul>")
        return "<div>" + "".join(parts) + "</div>"

    def __repr__(self) -> str:
        return (f"ScanResult(n_documents={len(self.context)}, scored={[lab for lab, _ in self.completed]}, "
                f"skipped={list(self.skipped)})")


def _shorten(value: Any, limit: int = 80) -> Any:
    """A long document's text cut for a summary table."""
    return value[:limit - 1] + "…" if isinstance(value, str) and len(value) > limit else value


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    def cells(tag: str, values: list[Any]) -> str:
        return "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values)

    return ("<table><thead><tr>" + cells("th", header) + "</tr></thead><tbody>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</tbody></table>")


def scan(data: Any, y: Any = None, *, model: Any = None, detectors: str | Sequence[str | PluginSpec] | None = None,
         reference: Any = None, behaviour: Any = None, probe: Any = None,
         truth: Sequence[int] | np.ndarray | None = None, expected_fraction: float = 0.01,
         influence: InfluenceConfig | dict | None = None, bootstrap: int = 1000, channels_last: bool | None = None,
         num_classes: int | None = None, features_layer: str | None = None, progress: bool = True,
         tokenizer: Any = None, max_length: int | None = None, caller: str = "python") -> ScanResult:
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
    ClassBehaviour or an (input, class) pair. `influence`: how influence is computed (an InfluenceConfig or a
    mapping of its fields; default: EK-FAC, damping 1e-3).
    `probe`: held-out inputs for influence probes (a dataset or a path). `detectors`: names (a list,
    or "a,b") or PluginSpecs; default: every registered detector that scores this kind of data. A
    detector that cannot run or fails is reported in the result, not raised.

    Text: `data` is a list of strings, any iterable of strings or of mappings with a "text" string (a
    `datasets.Dataset`), a .jsonl path or a TextDataset, with the `tokenizer` the model was trained with (a
    Hugging Face tokenizer or its folder); `model` a transformers causal LM; documents are cut to
    `max_length` tokens (default: the longest document, at most the model's positions). `reference`: the
    trusted texts in the same order; `behaviour`: a (word_a, word_b) pair, word B predicted where the model
    predicts word A, probed on the data's own prefixes before A.

    Anything unusable (a bad shape, NaNs, non-integer labels, a model that cannot take the inputs, an
    unknown detector) raises UserError (its subclass DataError for data) with a one-line message. `caller`
    ("python" or "command line") words the reasons in `result.skipped` as keywords of this call or as flags.
    """
    data = as_dataset(data, y, channels_last=channels_last, num_classes=num_classes, progress=progress,
                      tokenizer=tokenizer, max_length=max_length,
                      positions=getattr(getattr(model, "config", None), "max_position_embeddings", None))
    if reference is not None and data.kind == "text":
        reference = as_dataset(reference, tokenizer=data.vocab, max_length=data.max_length, what="reference")
        if len(reference) != len(data) or reference.max_length != data.max_length:
            raise DataError(f"reference: {len(reference)} documents of up to {reference.max_length} tokens, the data "
                            f"{len(data)} of up to {data.max_length}; a reference holds the same documents in order")
    elif reference is not None:
        labels = data.y if isinstance(reference, (np.ndarray, torch.Tensor)) and hasattr(data, "y") else None
        reference = as_dataset(reference, labels, channels_last=channels_last, num_classes=getattr(
            data, "num_classes", None), what="reference", progress=progress)
    if probe is not None:
        if data.kind != "image":
            raise UserError("probe: held-out inputs for influence probes are images; a text scan takes none")
        probe = as_dataset(probe, channels_last=channels_last, num_classes=getattr(data, "num_classes", None),
                           what="probe", progress=progress)
        if probe.input_shape != data.input_shape:
            raise DataError(f"probe: inputs of shape {probe.input_shape}, the data's are {data.input_shape}")
    behaviour = as_behaviour(behaviour, data)
    if model is not None:
        check_model(model, data)
    configure(None, "cpu" if model is None else model_device(model).type)  # the caller's threads; cuda: deterministic
    specs = detector_specs(detectors, data)
    if not isinstance(influence, InfluenceConfig):
        influence = from_dict(InfluenceConfig, influence or {}, "influence")
    context = audit_context(data, model, reference=reference, behaviour=behaviour, probe=probe,
                            expected_fraction=expected_fraction, features_layer=features_layer, progress=progress,
                            influence=influence, caller=caller)
    info = {"data": {"name": data.name, "kind": data.kind, "n": len(data)}}
    if data.kind == "image":
        info["data"].update(shape=list(data.input_shape), num_classes=data.num_classes, class_names=data.class_names)
    elif data.kind == "text":
        info["data"].update(max_length=data.max_length, vocabulary=data.vocab.size)
    if model is not None:
        info["model"] = {"source": "python", "class": type(model).__name__}
    return ScanResult(detect(context, specs, truth=truth, bootstrap=bootstrap), info)

