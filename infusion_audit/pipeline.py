"""What the user defines, once: the training pipeline under audit (in the spirit of kronfluence's `Task`).

A `Pipeline` gives the train and test data, the model factory, how to train from a checkpoint for some
epochs in the library's data order, the per-document loss, the task's quality figure and the behaviours
an attacker may want. Everything else (the attack context, craft -> retrain -> measure against a clean
control, detection, defence, the bench) is the library's and is the same for images and text.

The built-in pipelines follow the config's recipe: `Pipeline` (image classification) and
`infusion_audit.text.TextPipeline` (causal language models). A team audits its own pipeline by
subclassing one and overriding what differs (`new_model`, `fit`, `loss`, ...), named in YAML as
``pipeline: {factory: {name: package.module:callable}}`` (the callable takes the PipelineConfig and,
for `scan`, ``data=``), or registered through the ``infusion_audit.pipelines`` entry-point group.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .backdoor import BackdoorBehaviour, BackdoorTarget, backdoor_targets
from .behaviour import ClassBehaviour, Target, sample_targets
from .config import PipelineConfig, PluginSpec, TargetsConfig, TrainConfig
from .data import DatasetSplit, build_dataset
from .errors import UserError
from .io import record_hash, stable_hash, verified, write_json
from .models import build_model
from .registry import PIPELINES
from .training import (Checkpoint, Wrap, accuracy, classification_loss, document_ids, document_seed, epoch_order,
                       seeded_model, train)


@PIPELINES.register("image")
class Pipeline:
    """Image classification by the config's recipe; subclass it to audit your own pipeline.

    Override `new_model` for your architecture and `fit` for your own training loop. A `fit` must be
    deterministic given its arguments: visit the documents in `self.order(dataset, epoch)` and seed any
    per-document randomness (augmentation) with `self.document_seed(dataset, epoch)`, so a poisoned
    retrain and its clean control differ only by the poison.
    """

    kind = "image"

    def __init__(self, config: PipelineConfig, data: DatasetSplit | None = None):
        self.config = config.on_device()  # auto resolved here: the fingerprint names the device computed on
        self.data = build_dataset(config.dataset) if data is None else data

    @staticmethod
    def from_config(config: PipelineConfig, data: DatasetSplit | None = None) -> "Pipeline":
        """The pipeline `config.factory` names (a registered one or a user's ``package.module:callable``, called
        with the config, `data` when given, and its params), else the built-in one for the dataset's kind
        ("image", "text"), on `data` if given (else the config's dataset)."""
        spec = config.factory or PluginSpec(config.kind())
        factory = PIPELINES.get(spec.name)
        try:
            pipeline = factory(config, **({"data": data} if data is not None else {}), **spec.params)
        except TypeError as exc:
            raise UserError(f"pipeline {spec.name!r}: cannot be built from the pipeline config and params "
                            f"{spec.params}: {exc}") from None
        if not isinstance(pipeline, Pipeline):
            raise UserError(f"pipeline {spec.name!r} returned {type(pipeline).__name__}, expected an "
                            "infusion_audit.Pipeline")
        return pipeline

    @property
    def train_cfg(self) -> TrainConfig:
        return self.config.train

    # ---- what a user overrides
    def new_model(self) -> nn.Module:
        """The model at initialisation, seeded by the recipe's seed."""
        train = self.data.train
        dims = {"in_channels": train.input_shape[0], "num_classes": train.num_classes}
        return seeded_model(lambda: build_model(self.config.model, **dims), self.config.train.seed)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean training loss of a batch from `dataset.batch(index)` (one document: its own loss)."""
        return classification_loss(model, batch)

    def fit(self, model: nn.Module, dataset, *, start: Checkpoint | None = None, until_epoch: int | None = None,
            on_epoch: Callable[[Checkpoint], None] | None = None, progress: bool = False,
            wrap: Wrap | None = None) -> nn.Module:
        """Train `model` from `start` (or its initialisation) to `until_epoch` (default: the recipe's
        epochs), calling `on_epoch` with a Checkpoint after each epoch; `wrap` lets a mitigation wrap the
        module and optimizer (a loop that cannot take it should not accept the keyword). Load `start`'s
        optimizer state from a copy: the same checkpoint may start several retrains."""
        return train(model, dataset, self.config.train, start=start, until_epoch=until_epoch, loss_fn=self.loss,
                     on_epoch=on_epoch, progress=progress, wrap=wrap)

    def evaluate(self, model: nn.Module, dataset) -> dict:
        """Figures logged per epoch and in the training metrics."""
        return {"accuracy": accuracy(model, dataset)}

    def quality(self, model: nn.Module) -> tuple[str, float]:
        """The task figure a quality floor applies to, and the accuracy columns of the records report."""
        return "test accuracy", accuracy(model, self.data.test)

    def targets(self, n: int, rule: str = "random-other", seed: int = 0, pairs: list | None = None,
                probes: int = 32, measure: str = "prefix") -> list:
        """The behaviours an attacker may want, as hashable targets with `as_dict()`: `n` seeded test images,
        each pushed towards another class, or (rule backdoor) `n` target classes of a backdoor (`pairs` and
        `measure` are for text behaviours)."""
        if pairs or measure != "prefix":
            raise UserError("attack.targets.pairs and measure name text behaviours; an image pipeline samples test images")
        if rule == "backdoor":
            return backdoor_targets(self.data.test.num_classes, n, seed)
        return sample_targets(self.data.test, n, rule, seed)

    def behaviour(self, target: Target | BackdoorTarget, probes: int = 32) -> ClassBehaviour | BackdoorBehaviour:
        """The measurement f(theta) of a target, with the figures records report (`probes`: the training images a
        backdoor's f averages over; the prompts of a text behaviour)."""
        if isinstance(target, BackdoorTarget):
            return BackdoorBehaviour.from_target(target, self.data, probes)
        return ClassBehaviour.from_target(target, self.data.test)

    def check(self, targets: TargetsConfig) -> None:
        """Run when an attack's config loads, before any training: every target of the `attack.targets`
        section resolves to a behaviour on the test set, or a one-line error names the pair at fault."""
        listed = self.targets(targets.n, targets.rule, targets.seed, targets.pairs, targets.probes, targets.measure)
        for i, target in enumerate(listed):
            try:
                self.behaviour(target, targets.probes)
            except UserError as exc:
                where = f"attack.targets.pairs[{i}] {targets.pairs[i]}" if targets.pairs else "attack.targets"
                raise UserError(f"{where}: {exc}") from None

    # ---- what the library derives
    def order(self, dataset, epoch: int) -> np.ndarray:
        """The order documents are seen in during `epoch` (0-based): the same for a retrain and its control."""
        return epoch_order(dataset, self.config.train, epoch)

    def document_seed(self, dataset, epoch: int) -> np.ndarray:
        """Per document of `dataset`, the seed of its randomness in `epoch` (follows the document, not its slot)."""
        return np.array([document_seed(self.config.train.seed, epoch, int(d)) for d in document_ids(dataset)])

    def model_at(self, checkpoint: Checkpoint) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(checkpoint.model)
        return model.to(self.config.train.device).eval()

    def continue_training(self, start: Checkpoint, dataset, epochs: int = 1) -> nn.Module:
        """The paper's retrain: from checkpoint E, `epochs` more epochs on (possibly edited) `dataset`."""
        return self.fit(self.new_model(), dataset, start=start, until_epoch=start.epoch + epochs)

    def retrain_from_scratch(self, dataset) -> nn.Module:
        """A full retrain from the seeded initialisation on `dataset`."""
        return self.fit(self.new_model(), dataset)

    def fingerprint(self) -> str:
        """What the trained checkpoints depend on: the config, the training data and, for a user's pipeline,
        the source of the module that defines it (an edited training loop is retrained, not reused)."""
        code = None
        if type(self).__module__.split(".")[0] != "infusion_audit":
            try:
                code = stable_hash(inspect.getsource(inspect.getmodule(type(self))))
            except (OSError, TypeError):
                code = type(self).__qualname__
        # "scenario" is schema 1's key: checkpoints trained before the rename keep their fingerprint
        return stable_hash({"scenario": self.config.identity(), "data": self.data.train.content_hash(),
                            **({"code": code} if code else {})})


@dataclass
class TrainedPipeline:
    pipeline: Pipeline
    checkpoints: list[Path]  # checkpoints[e] is the state after e epochs
    metrics: dict

    def checkpoint(self, epoch: int) -> Checkpoint:
        return Checkpoint.load(self.checkpoints[epoch])

    def model(self, epoch: int | None = None) -> nn.Module:
        return self.pipeline.model_at(self.checkpoint(len(self.checkpoints) - 1 if epoch is None else epoch))


def train_pipeline(pipeline: Pipeline, out_dir: str | Path, progress: bool = True) -> TrainedPipeline:
    """Train with a checkpoint per epoch under out_dir/train-<fingerprint>/; finished epochs are reused (resume).

    Each checkpoint is reused only while it matches the hash recorded when it was written: training
    resumes after the last intact epoch, so a damaged one is recomputed (with a warning), never loaded."""
    cfg = pipeline.train_cfg
    ckpt_dir = Path(out_dir) / f"train-{pipeline.fingerprint()}"
    paths = [ckpt_dir / f"epoch-{e:03d}.pt" for e in range(cfg.epochs + 1)]
    metrics_path = ckpt_dir / "metrics.json"
    intact = 0  # epochs 0..intact-1 verified
    while intact < len(paths) and verified(paths[intact]):
        intact += 1
    if intact == len(paths) and verified(metrics_path):
        return TrainedPipeline(pipeline, paths, json.loads(metrics_path.read_text()))
    model = pipeline.new_model()
    start = None
    resume = intact - 1 if intact else None
    if resume is None:
        record_hash(Checkpoint.capture(0, model, None).save(paths[0]))  # no optimizer state: the fit's own starts fresh
    else:
        start = Checkpoint.load(paths[resume])
        logging.getLogger(__name__).info("resuming training from epoch %d", resume)
    history: list[dict] = []
    t0 = time.perf_counter()

    def on_epoch(ckpt: Checkpoint) -> None:
        record_hash(ckpt.save(paths[ckpt.epoch]))
        history.append({"epoch": ckpt.epoch, **pipeline.evaluate(model, pipeline.data.test)})

    pipeline.fit(model, pipeline.data.train, start=start, on_epoch=on_epoch, progress=progress)
    figure, value = pipeline.quality(model)
    metrics = {
        "train_seconds": time.perf_counter() - t0,
        "resumed_from_epoch": resume,
        "train": pipeline.evaluate(model, pipeline.data.train),
        "test": pipeline.evaluate(model, pipeline.data.test),
        "quality": {"figure": figure, "value": value},
        "n_train": len(pipeline.data.train),
        "n_test": len(pipeline.data.test),
        "history": history,
    }
    record_hash(write_json(metrics_path, metrics))
    return TrainedPipeline(pipeline, paths, metrics)
