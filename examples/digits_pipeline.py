"""A training pipeline as a team would write it, audited by infusion-audit: its own CNN and its own loop
(SGD with momentum, a cosine learning-rate schedule, random shifts and rotations of each digit).

The library trains it, retrains it on poisoned copies of the data and on the clean control, and compares.
A config names it `digits_pipeline:AugmentedDigits`; the module must be importable, so from the repository root:
    PYTHONPATH=examples infusion-audit bench examples/digits_pipeline.yaml --out runs/digits-pipeline
"""

import copy

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchvision.transforms import v2

from infusion_audit import Checkpoint, Pipeline

# About one pixel of shift and a few degrees of rotation: what an 8x8 digit can take and stay itself.
AUGMENT = v2.RandomAffine(degrees=10, translate=(0.125, 0.125))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AugmentedDigits(Pipeline):
    """Data, per-document loss and behaviours are the library's; the model and the training are ours.
    The recipe's numbers (lr, momentum, batch size, epochs, seed) come from the config's `train:` section."""

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.config.train.seed)  # the same initialisation every time it is asked for
        return SmallCNN(self.data.train.num_classes)

    def fit(self, model, dataset, *, start=None, until_epoch=None, on_epoch=None, progress=False, wrap=None):
        cfg = self.config.train
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        schedule = CosineAnnealingLR(optimizer, T_max=cfg.epochs)  # stepped once per epoch
        if start is not None:  # continue where the checkpoint left off: weights, momentum and schedule
            model.load_state_dict(start.model)
            if start.epoch:  # what this fit saved (below); at epoch 0 there is no momentum or schedule yet
                optimizer.load_state_dict(copy.deepcopy(start.optimizer))  # SGD updates its momentum in place
                schedule.load_state_dict(start.meta["schedule"])
        stepper, step_optimizer = model, optimizer
        if wrap is not None:  # lets a mitigation (per-example clipping) change how each step is computed
            stepper, step_optimizer = wrap(model, optimizer, len(dataset), cfg.batch_size)
        for epoch in range(start.epoch if start else 0, cfg.epochs if until_epoch is None else until_epoch):
            stepper.train()
            # The library's order and per-document seeds: a poisoned retrain and its clean control see the
            # same documents in the same batches with the same augmentation, so they differ only by the poison.
            order, seeds = self.order(dataset, epoch), self.document_seed(dataset, epoch)
            for i in range(0, len(order), cfg.batch_size):
                index = order[i:i + cfg.batch_size]
                x, y = dataset.batch(index)
                x = augment(x, seeds[index])
                step_optimizer.zero_grad()
                self.loss(stepper, (x, y)).backward()  # the per-document loss the library measures with
                step_optimizer.step()
            schedule.step()
            if on_epoch is not None:
                on_epoch(Checkpoint.capture(epoch + 1, model, optimizer, {"schedule": schedule.state_dict()}))
        return model.eval()


def augment(x: torch.Tensor, seeds) -> torch.Tensor:
    """Each image under its own seed (a document's, for this epoch), leaving the global RNG as it was."""
    out = torch.empty_like(x)
    with torch.random.fork_rng(devices=[]):
        for row, seed in enumerate(seeds):
            torch.default_generator.manual_seed(int(seed))  # the CPU generator the transforms draw from
            out[row] = AUGMENT(x[row])
    return out
