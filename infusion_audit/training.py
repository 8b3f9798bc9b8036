"""Deterministic training: seeded init, a fixed (or seeded) data order, one checkpoint per epoch.

The attack evaluation depends on this: a poisoned retrain and its clean control start from the same
checkpoint and see the documents in the same order, so any difference between them is the poison's.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import ConfigError, DataError, first_line
from .runtime import resolve_device

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Wrap = Callable[[nn.Module, torch.optim.Optimizer, int, int], tuple[nn.Module, torch.optim.Optimizer]]


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


def document_ids(dataset) -> np.ndarray:
    """Each document's position in the full training set (a dataset with documents removed keeps its
    parent's numbering), so per-document randomness follows the document, not its slot."""
    parent = getattr(dataset, "parent_positions", None)
    return np.arange(len(dataset)) if parent is None else np.asarray(parent[1])


def document_seed(seed: int, epoch: int, document: int) -> int:
    """The seed of one document's randomness (its augmentation) in one epoch: the same in a poisoned retrain
    and its clean control, so the two differ only by the poison."""
    return int(np.random.SeedSequence([seed, epoch, document]).generate_state(1)[0])


def augmentation(cfg: TrainConfig) -> Callable[[torch.Tensor, np.ndarray, int], torch.Tensor] | None:
    """`cfg.augment` as a function of (images, document ids, epoch): torchvision.transforms.v2, each image
    under its own `document_seed` (the global RNG is left as it was)."""
    if not cfg.augment:
        return None
    from torchvision.transforms import v2

    try:
        transform = v2.Compose([getattr(v2, spec.name)(**spec.params) for spec in cfg.augment])
    except (TypeError, ValueError) as exc:
        raise ConfigError("<config>", "pipeline.train.augment", "valid transform params", str(exc)) from None

    def apply(x: torch.Tensor, documents: np.ndarray, epoch: int) -> torch.Tensor:
        out = torch.empty_like(x)
        with torch.random.fork_rng(devices=[]):
            for row, document in enumerate(documents):
                torch.default_generator.manual_seed(document_seed(cfg.seed, epoch, int(document)))  # CPU RNG only
                out[row] = transform(x[row])
        return out

    return apply


@contextmanager
def epoch_rng(seed: int, epoch: int, device: torch.device):
    """Torch's random state for one epoch, seeded by (seed, epoch) and restored after: a model's own randomness
    (dropout) is then the same whichever process or machine trains it, and in a retrain and its control."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        torch.default_generator.manual_seed(state)
        if device.type == "cuda":
            torch.cuda.manual_seed(state)
        yield


def epoch_lrs(cfg: TrainConfig) -> list[float]:
    """The learning rate of every epoch: `cfg.lr` under `cfg.schedule` (a torch scheduler stepped once per
    epoch), computed up front so a retrain that starts at epoch E uses the lr the schedule gives E."""
    if cfg.schedule is None:
        return [cfg.lr] * cfg.epochs
    import torch.optim.lr_scheduler as schedulers

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    lrs = []
    try:
        scheduler = getattr(schedulers, cfg.schedule.name)(optimizer, **cfg.schedule.params)
        for _ in range(cfg.epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    except (TypeError, ValueError) as exc:
        raise ConfigError("<config>", "pipeline.train.schedule",
                          "a scheduler stepped once per epoch, with valid params", str(exc)) from None
    return lrs


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def seeded_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


@dataclass
class Retrained:
    """What one retrain produced: the `model` (class scores or LM logits, like any model of the pipeline), the
    `figures` a mitigation reports about it (ε, shard sizes, ...; none for a plain retrain), and, for a
    mitigation that has them, figures about one input (`figures_at`, e.g. a certified radius)."""

    model: nn.Module
    figures: dict = field(default_factory=dict)
    per_input: Callable[[torch.Tensor], dict] | None = None

    def figures_at(self, x: torch.Tensor) -> dict:
        """Figures about input `x` (no batch dimension); {} where there are none."""
        return self.per_input(x) if self.per_input is not None else {}


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
            raise DataError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
        if not isinstance(blob, dict) or "model" not in blob:
            raise DataError(f"{path}: not an infusion-audit checkpoint (no 'model' entry)")
        return cls(int(blob.get("epoch", 0)), blob["model"], blob.get("optimizer", {}), blob.get("meta", {}))

    @classmethod
    def capture(cls, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict | None = None) -> "Checkpoint":
        """A copy of the state on the CPU: whichever device trained it, a checkpoint saves and loads without one."""
        return cls(epoch, _cpu_copy(model.state_dict()),
                   _cpu_copy(optimizer.state_dict()) if optimizer is not None else {}, dict(meta or {}))


def _cpu_copy(state: Any) -> Any:
    """A deep copy of a state dict (nested dicts, lists, tuples) with every tensor on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):  # an OrderedDict keeps its type and the version `_metadata` load_state_dict reads
        out = type(state)((key, _cpu_copy(value)) for key, value in state.items())
        if hasattr(state, "_metadata"):
            out._metadata = copy.deepcopy(state._metadata)
        return out
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(value) for value in state)
    return copy.deepcopy(state)


def train(model: nn.Module, dataset, cfg: TrainConfig, *, start: Checkpoint | None = None,
          until_epoch: int | None = None, loss_fn: LossFn = classification_loss,
          on_epoch: Callable[[Checkpoint], None] | None = None, progress: bool = True,
          wrap: Wrap | None = None) -> nn.Module:
    """Train `model` in place from `start` (or its current weights) to `until_epoch` (default cfg.epochs).

    `on_epoch` receives a Checkpoint after every epoch (to save it, or to evaluate). `wrap(model, optimizer,
    n_documents, batch_size)` returns the module and optimizer to train with instead (a mitigation such as
    per-example clipping); the weights it trains are `model`'s, which is what is returned.
    """
    device = resolve_device(cfg.device)
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
    trained = model
    if wrap is not None:
        trained, optimizer = wrap(model, optimizer, n, cfg.batch_size)
    lrs, augment, ids = epoch_lrs(cfg), augmentation(cfg), document_ids(dataset)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(total=(last - first) * steps, desc="train", unit="step", disable=not progress or last <= first,
               leave=False)
    for epoch in range(first, last):
        for group in optimizer.param_groups:
            group["lr"] = lrs[min(epoch, len(lrs) - 1)]
        trained.train()
        order = epoch_order(dataset, cfg, epoch)
        total = 0.0
        with epoch_rng(cfg.seed, epoch, device):  # dropout and any other randomness inside the model
            for s in range(steps):
                index = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                total += train_step(trained, model, optimizer, dataset, index, cfg, device, epoch, s, loss_fn, augment,
                                    ids)
                bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / steps:.4f}")
        if on_epoch is not None:
            on_epoch(Checkpoint.capture(epoch + 1, model, optimizer))
    bar.close()
    model.eval()
    return model


def train_step(trained: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, dataset, index: np.ndarray,
               cfg: TrainConfig, device: torch.device, epoch: int, step: int, loss_fn: LossFn, augment=None,
               ids: np.ndarray | None = None) -> float:
    """One optimizer step of the built-in loop on documents `index` (`trained`: the module trained, a
    mitigation's wrapper or `model` itself); the one step `train` and a segment replay share. Returns the loss."""
    batch = dataset.batch(index, device)
    if augment is not None:
        batch = (augment(batch[0], ids[index], epoch), *batch[1:])
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = loss_fn(trained, batch)
    if not torch.isfinite(loss):
        raise DataError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {loss.item()}); lower lr")
    loss.backward()
    if cfg.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(x[i:i + batch_size].to(device)), -1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def accuracy(model: nn.Module, dataset) -> float:
    x, y = dataset.batch(np.arange(len(dataset)))
    return float((predict_proba(model, x).argmax(1) == y).float().mean())
