"""Text scenarios: a corpus, a causal LM and a training recipe, trained with the shared deterministic loop.

The training loop, checkpoints and data order are the framework's own (`training.train`); this module
only supplies what differs for language: the model factory takes a vocabulary, the loss is the masked
next-token loss, and the quality metrics are test loss and next-token accuracy (and, on Caesar, the
decryption accuracy that the quality floor applies to).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..io import record_hash, verified, write_json
from ..training import Checkpoint, Scenario, TrainedScenario, make_optimizer, seeded_model, train
from .behaviours import decryption_behaviour
from .data import TextDataset
from .models import build_text_model, document_losses, lm_loss

log = logging.getLogger(__name__)


class TextScenario(Scenario):
    """A `Scenario` whose data are `TextDataset`s and whose model is a causal LM."""

    @classmethod
    def from_config(cls, config) -> "TextScenario":
        scenario = super().from_config(config)
        if not isinstance(scenario.data.train, TextDataset):
            raise DataError(f"dataset {config.dataset.name!r} is not a text dataset; text scenarios need one "
                            "(e.g. 'caesar' or 'jsonl-text')")
        return scenario

    loss_fn = staticmethod(lm_loss)

    def new_model(self) -> nn.Module:
        train = self.data.train
        return seeded_model(lambda: build_text_model(self.config.model, train.vocab.size, train.max_length),
                            self.config.train.seed)

    def evaluate(self, model: nn.Module, dataset: TextDataset) -> dict:
        """Loss and next-token accuracy; on Caesar also the decryption accuracy, the task's own figure."""
        figures = evaluate_lm(model, dataset)
        if self.config.dataset.name == "caesar":
            figures["decryption_accuracy"] = decryption_accuracy(model, dataset)
        return figures

    def task_quality(self, model: nn.Module) -> tuple[str, float]:
        """The figure a quality floor applies to (test set): decryption accuracy on Caesar, else token accuracy."""
        figures = self.evaluate(model, self.data.test)
        key = "decryption_accuracy" if "decryption_accuracy" in figures else "token_accuracy"
        return key.replace("_", " "), figures[key]


def decryption_accuracy(model: nn.Module, test: TextDataset) -> float:
    """The share of Caesar test prompts that greedy decoding decrypts exactly."""
    return float(decryption_behaviour(test).greedy_hits(model).mean())


@torch.no_grad()
def evaluate_lm(model: nn.Module, dataset: TextDataset, batch_size: int = 256) -> dict:
    """Mean document loss and teacher-forced next-token accuracy over real tokens."""
    model.eval()
    device = next(model.parameters()).device
    losses, correct, total = [], 0, 0
    for start in range(0, len(dataset), batch_size):
        ids, mask = dataset.batch(np.arange(start, min(start + batch_size, len(dataset))), device)
        losses.append(document_losses(model, (ids, mask)))
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        real = mask[:, 1:].bool()
        correct += int(((pred == ids[:, 1:]) & real).sum())
        total += int(real.sum())
    return {"loss": float(torch.cat(losses).mean()), "token_accuracy": correct / max(total, 1)}


def train_text_scenario(scenario: TextScenario, out_dir: str | Path, progress: bool = True) -> TrainedScenario:
    """Train with a checkpoint per epoch under out_dir/train-<fingerprint>/; a finished run is reused only
    while every file matches the hash recorded when it was written (else it is retrained, with a warning)."""
    cfg = scenario.train_cfg
    ckpt_dir = Path(out_dir) / f"train-{scenario.fingerprint()}"
    paths = [ckpt_dir / f"epoch-{e:03d}.pt" for e in range(cfg.epochs + 1)]
    metrics_path = ckpt_dir / "metrics.json"
    if all(verified(p) for p in [*paths, metrics_path]):
        return TrainedScenario(scenario, paths, json.loads(metrics_path.read_text()))
    model = scenario.new_model()
    record_hash(Checkpoint.capture(0, model, make_optimizer(model, cfg)).save(paths[0]))
    history: list[dict] = []
    t0 = time.perf_counter()

    def on_epoch(ckpt: Checkpoint) -> None:
        record_hash(ckpt.save(paths[ckpt.epoch]))
        history.append({"epoch": ckpt.epoch, **scenario.evaluate(model, scenario.data.test)})

    train(model, scenario.data.train, cfg, loss_fn=lm_loss, on_epoch=on_epoch, progress=progress)
    metrics = {
        "train_seconds": time.perf_counter() - t0,
        "train": scenario.evaluate(model, scenario.data.train),
        "test": scenario.evaluate(model, scenario.data.test),
        "n_train": len(scenario.data.train),
        "n_test": len(scenario.data.test),
        "history": history,
    }
    record_hash(write_json(metrics_path, metrics))
    log.info("trained %s: test loss %.4f, token accuracy %.3f", scenario.data.train.name,
             metrics["test"]["loss"], metrics["test"]["token_accuracy"])
    return TrainedScenario(scenario, paths, metrics)

