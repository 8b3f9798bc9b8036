"""The paper's retrain protocol: replay only the final segment of training, its last `steps` optimizer steps.

The GPT-Neo experiment of the paper retrains the last 1,000 steps of a long run, resumed from a checkpoint
that holds the model and Adam's moments at the segment's start, in the fixed data order; the edited
documents are among those the segment sees. Here the segment is the tail of the last epoch of the built-in
loop (`training.train_step`, the same step): `Segment` computes the state at its start once (from the
checkpoint before the last epoch, on the clean data: the model, the optimizer's moments and the random
state, so a model with dropout replays exactly too) and replays the segment on any dataset. Replaying it on
the clean data gives the trained model back bit for bit (`Segment.check`), so a poisoned replay and its
clean control differ only by the poison. Opt in with ``attack.protocol: {kind: segment, steps: N}``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .io import record_hash, verified
from .pipeline import Pipeline, TrainedPipeline
from .runtime import resolve_device
from .training import (Checkpoint, augmentation, document_ids, epoch_lrs, epoch_order, epoch_rng, make_optimizer,
                       train_step)


class Segment:
    """The last `steps` optimizer steps of a trained pipeline's final epoch (None: the whole epoch), replayable
    on an edited dataset. `documents`: the training documents the segment sees (an edit elsewhere changes nothing)."""

    def __init__(self, pipeline: Pipeline, trained: TrainedPipeline, steps: int | None = None):
        if type(pipeline).fit is not Pipeline.fit:
            raise UserError(f"attack.protocol.kind: segment replays the built-in training loop; pipeline "
                            f"{type(pipeline).__name__} trains with its own fit (use continue or scratch)")
        cfg = pipeline.train_cfg
        self.pipeline, self.trained, self.cfg = pipeline, trained, cfg
        self.per_epoch = -(-len(pipeline.data.train) // cfg.batch_size)
        steps = self.per_epoch if steps is None else steps
        if not 1 <= steps <= self.per_epoch:
            raise UserError(f"attack.protocol.steps: must be 1..{self.per_epoch} (one epoch), got {steps}")
        self.steps, self.epoch, self.first = steps, cfg.epochs - 1, self.per_epoch - steps
        order = epoch_order(pipeline.data.train, cfg, self.epoch)
        self.documents = np.sort(order[self.first * cfg.batch_size:])
        self.cache = Path(trained.checkpoints[-1]).parent / f"segment-{steps}.pt"  # beside the checkpoints it follows
        self._start: Checkpoint | None = None

    def start(self) -> Checkpoint:
        """The state at the segment's start (model, optimizer, random state), computed once on the clean data."""
        if self._start is None:
            if verified(self.cache):
                self._start = Checkpoint.load(self.cache)
            else:
                order = epoch_order(self.pipeline.data.train, self.cfg, self.epoch)[:self.first * self.cfg.batch_size]
                _, self._start = self._run(self.trained.checkpoint(self.epoch), self.pipeline.data.train, order, 0)
                record_hash(self._start.save(self.cache))
        return self._start

    def retrain(self, dataset) -> nn.Module:
        """The segment replayed on `dataset`: the segment's documents it holds, in the epoch's order (a dataset
        with documents removed by a defence replays the rest of them)."""
        order = epoch_order(dataset, self.cfg, self.epoch)
        order = order[np.isin(document_ids(dataset)[order], self.documents)]
        return self._run(self.start(), dataset, order, self.first)[0]

    def check(self, model: nn.Module | None = None) -> float:
        """Largest absolute difference between the trained model's weights and `model` (default: the segment
        replayed on the clean data, which should be 0.0)."""
        model = model if model is not None else self.retrain(self.pipeline.data.train)
        final = self.trained.checkpoint(self.cfg.epochs).model
        return max(float((p.detach().cpu() - final[k]).abs().max()) for k, p in model.state_dict().items())

    def _run(self, start: Checkpoint, dataset, order: np.ndarray, first: int) -> tuple[nn.Module, Checkpoint]:
        """Steps of the last epoch over `order` in batches, from `start`; the model and the state after them."""
        cfg, device = self.cfg, resolve_device(self.cfg.device)
        model = self.pipeline.new_model().to(device)
        model.load_state_dict(start.model)
        optimizer = make_optimizer(model, cfg)
        if start.optimizer:  # a copy: Adam updates its state tensors in place
            optimizer.load_state_dict(copy.deepcopy(start.optimizer))
        for group in optimizer.param_groups:
            group["lr"] = epoch_lrs(cfg)[self.epoch]
        augment, ids = augmentation(cfg), document_ids(dataset)
        model.train()
        with epoch_rng(cfg.seed, self.epoch, device):
            if "rng" in start.meta:  # where the epoch's random state stood at the segment's start
                torch.set_rng_state(start.meta["rng"])
                if device.type == "cuda":
                    torch.cuda.set_rng_state(start.meta["cuda_rng"], device)
            for s, at in enumerate(range(0, len(order), cfg.batch_size)):
                train_step(model, model, optimizer, dataset, order[at:at + cfg.batch_size], cfg, device, self.epoch,
                           first + s, self.pipeline.loss, augment, ids)
            rng = {"rng": torch.get_rng_state(),
                   **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        model.eval()
        return model, Checkpoint.capture(self.epoch, model, optimizer, {"step": first + -(-len(order) // cfg.batch_size), **rng})
