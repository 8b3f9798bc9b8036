"""Deterministic training: seeded init, a fixed (or seeded) data order, one checkpoint per epoch.

The attack evaluation depends on this: a poisoned retrain and its clean control start from the same
checkpoint and see the documents in the same order, so any difference between them is the poison's.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ScenarioConfig, TrainConfig
from .data import DatasetSplit, build_dataset
from .errors import DataError
from .io import record_hash, stable_hash, verified, write_json
from .models import build_model

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def data_order(n: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """The order documents are seen in during `epoch` (0-based): the same for a poisoned run and its control."""
    if cfg.order == "fixed":
        return np.random.default_rng(cfg.seed).permutation(n)
    return np.random.default_rng([cfg.seed, epoch]).permutation(n)


def epoch_order(dataset, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """`data_order` for `dataset`. A dataset with documents removed replays its parent's order skipping
    them, so a retrain after a defence differs from the full retrain only by what was removed."""
    parent = getattr(dataset, "parent_positions", None)
    if parent is None:
        return data_order(len(dataset), cfg, epoch)
    n_parent, kept = parent
    position = np.full(n_parent, -1)
    position[kept] = np.arange(len(kept))
    order = position[data_order(n_parent, cfg, epoch)]
    return order[order >= 0]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.lr_milestones)


def seeded_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


@dataclass
class Checkpoint:
    """Model and optimizer state after `epoch` epochs (epoch 0 = the initialisation)."""

    epoch: int
    model: dict
    optimizer: dict
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        import io

        from .io import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"epoch": self.epoch, "model": self.model, "optimizer": self.optimizer, "meta": self.meta}, buf)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Load with weights_only=True: a checkpoint can hold tensors and plain values, never code."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"{path}: no such checkpoint") from None
        except Exception as exc:
            raise DataError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
        if not isinstance(blob, dict) or "model" not in blob:
            raise DataError(f"{path}: not an infusion-audit checkpoint (no 'model' entry)")
        return cls(int(blob.get("epoch", 0)), blob["model"], blob.get("optimizer", {}), blob.get("meta", {}))

    @classmethod
    def capture(cls, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict | None = None) -> "Checkpoint":
        return cls(epoch, copy.deepcopy(model.state_dict()),
                   copy.deepcopy(optimizer.state_dict()) if optimizer is not None else {}, dict(meta or {}))


def train(model: nn.Module, dataset, cfg: TrainConfig, *, start: Checkpoint | None = None,
          until_epoch: int | None = None, loss_fn: LossFn = classification_loss,
          on_epoch: Callable[[Checkpoint], None] | None = None, progress: bool = True) -> nn.Module:
    """Train `model` in place from `start` (or its current weights) to `until_epoch` (default cfg.epochs).

    `on_epoch` receives a Checkpoint after every epoch (to save it, or to evaluate).
    """
    device = torch.device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    first = 0
    if start is not None:
        model.load_state_dict(start.model)
        if start.optimizer:  # a copy: Adam and momentum update their state tensors in place
            optimizer.load_state_dict(copy.deepcopy(start.optimizer))
        first = start.epoch
    last = cfg.epochs if until_epoch is None else until_epoch
    n = len(dataset)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(total=(last - first) * steps, desc="train", unit="step", disable=not progress or last <= first,
               leave=False)
    for epoch in range(first, last):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        model.train()
        order = epoch_order(dataset, cfg, epoch)
        total = 0.0
        for s in range(steps):
            batch = dataset.batch(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise DataError(f"training diverged at epoch {epoch + 1}, step {s + 1} (loss {loss.item()}); lower lr")
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / steps:.4f}")
        if on_epoch is not None:
            on_epoch(Checkpoint.capture(epoch + 1, model, optimizer))
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(x[i:i + batch_size].to(device)), -1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def accuracy(model: nn.Module, dataset) -> float:
    x, y = dataset.batch(np.arange(len(dataset)))
    return float((predict_proba(model, x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- scenarios
@dataclass
class Scenario:
    """A scenario made concrete: its data, a seeded model factory and the training recipe."""

    config: ScenarioConfig
    data: DatasetSplit

    @classmethod
    def from_config(cls, config: ScenarioConfig) -> "Scenario":
        return cls(config, build_dataset(config.dataset))

    @property
    def train_cfg(self) -> TrainConfig:
        return self.config.train

    loss_fn = staticmethod(classification_loss)  # a class attribute, not a field: text scenarios override it

    def new_model(self) -> nn.Module:
        """The model at initialisation, seeded by the recipe's seed."""
        train = self.data.train
        dims = {"in_channels": train.input_shape[0], "num_classes": train.num_classes}
        return seeded_model(lambda: build_model(self.config.model, **dims), self.config.train.seed)

    def model_at(self, checkpoint: Checkpoint) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(checkpoint.model)
        return model.to(self.config.train.device).eval()

    def fingerprint(self) -> str:
        """What the trained checkpoints depend on: the config and the training data's content."""
        return stable_hash({"scenario": self.config.identity(), "data": self.data.train.content_hash()})


@dataclass
class TrainedScenario:
    scenario: Scenario
    checkpoints: list[Path]  # checkpoints[e] is the state after e epochs
    metrics: dict

    def checkpoint(self, epoch: int) -> Checkpoint:
        return Checkpoint.load(self.checkpoints[epoch])

    def model(self, epoch: int | None = None) -> nn.Module:
        return self.scenario.model_at(self.checkpoint(len(self.checkpoints) - 1 if epoch is None else epoch))


def train_scenario(scenario: Scenario, out_dir: str | Path, progress: bool = True) -> TrainedScenario:
    """Train with a checkpoint per epoch under out_dir/<fingerprint>/; finished epochs are reused (resume).

    Each checkpoint is reused only while it matches the hash recorded when it was written: training
    resumes after the last intact epoch, so a damaged one is recomputed (with a warning), never loaded."""
    cfg = scenario.train_cfg
    ckpt_dir = Path(out_dir) / f"train-{scenario.fingerprint()}"
    paths = [ckpt_dir / f"epoch-{e:03d}.pt" for e in range(cfg.epochs + 1)]
    metrics_path = ckpt_dir / "metrics.json"
    intact = 0  # epochs 0..intact-1 verified
    while intact < len(paths) and verified(paths[intact]):
        intact += 1
    if intact == len(paths) and verified(metrics_path):
        import json

        return TrainedScenario(scenario, paths, json.loads(metrics_path.read_text()))
    model = scenario.new_model()
    start = None
    resume = intact - 1 if intact else None
    if resume is None:
        record_hash(Checkpoint.capture(0, model, make_optimizer(model, cfg)).save(paths[0]))
    else:
        start = Checkpoint.load(paths[resume])
        log.info("resuming training from epoch %d", resume)
    history: list[dict] = []
    t0 = time.perf_counter()

    def on_epoch(ckpt: Checkpoint) -> None:
        record_hash(ckpt.save(paths[ckpt.epoch]))
        history.append({"epoch": ckpt.epoch, "test_accuracy": accuracy(model, scenario.data.test)})

    train(model, scenario.data.train, cfg, start=start, on_epoch=on_epoch, progress=progress)
    metrics = {
        "train_seconds": time.perf_counter() - t0,
        "resumed_from_epoch": resume,
        "train_accuracy": accuracy(model, scenario.data.train),
        "test_accuracy": accuracy(model, scenario.data.test),
        "n_train": len(scenario.data.train),
        "n_test": len(scenario.data.test),
        "history": history,
    }
    record_hash(write_json(metrics_path, metrics))
    return TrainedScenario(scenario, paths, metrics)


def continue_training(scenario: Scenario, start: Checkpoint, dataset, epochs: int = 1,
                      progress: bool = False) -> nn.Module:
    """The paper's retrain: from checkpoint E, `epochs` more epochs on (possibly edited) `dataset`."""
    return train(scenario.new_model(), dataset, scenario.train_cfg, start=start, until_epoch=start.epoch + epochs,
                 loss_fn=scenario.loss_fn, progress=progress)


def retrain_from_scratch(scenario: Scenario, dataset, progress: bool = False) -> nn.Module:
    """Full retrain from the seeded initialisation on `dataset` (after a defence removed documents)."""
    return train(scenario.new_model(), dataset, scenario.train_cfg, loss_fn=scenario.loss_fn, progress=progress)
