"""Plugins that misbehave on purpose, for the fault tests (named in a config as ``fault_plugins:Class``, with
this folder on the import path of the bench and of its workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from infusion_audit.attacks.baselines import LabelFlip
from infusion_audit.detectors.training_signals import LossOutlier

HOLD = "INFUSION_AUDIT_TEST_HOLD"  # a folder: the first craft of the bench waits there to be killed


class HeldLabelFlip(LabelFlip):
    """label-flip. With $INFUSION_AUDIT_TEST_HOLD naming a folder, the first craft in any process writes its
    process id to FOLDER/held and waits (up to 5 minutes) for the test to kill it; every craft that gets
    through leaves FOLDER/crafted-<target index>-<process id>. Its numbers are label-flip's either way."""

    def craft(self, context, target):
        folder = os.environ.get(HOLD)
        if folder:
            try:
                fd = os.open(Path(folder) / "held", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(300)
            (Path(folder) / f"crafted-{target.index}-{os.getpid()}").touch()
        return super().craft(context, target)


class FailingLabelFlip(LabelFlip):
    """label-flip that raises on the target whose test index is `fail_on`."""

    def __init__(self, k: int | float = 0.01, selection: str = "most-negative", seed: int = 0, fail_on: int = -1):
        super().__init__(k, selection, seed)
        self.fail_on = fail_on

    def craft(self, context, target):
        if target.index == self.fail_on:
            raise RuntimeError(f"cannot poison test document {target.index}")
        return super().craft(context, target)


class FailingLossOutlier(LossOutlier):
    """loss-outlier that raises on the poisoned set of the target whose test index is `fail_on` (it reads the
    target from the behaviour a bench hands its detectors)."""

    def __init__(self, signal: str = "loss", fail_on: int = -1):
        super().__init__(signal)
        self.fail_on = fail_on

    def score(self, context):
        if context.behaviour is not None and f"test document {self.fail_on} " in context.behaviour.description:
            raise ValueError(f"no scores for the set poisoned against document {self.fail_on}")
        return super().score(context)
