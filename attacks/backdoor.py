"""Backdoor attacks: a trigger that, stamped on any input, makes the model output the attacker's class.

Each plants its target's trigger (the arm's, else the attack's own; see `infusion_audit.backdoor`) within a
budget of k documents: `badnets` and `blend` stamp it on k documents of the other classes and relabel them
(dirty label); `clean-label-backdoor` stamps it on k documents of the target class made hard by a bounded
perturbation, labels kept; `sleeper-agent` stamps nothing, it perturbs k target-class documents so that training
on them takes the step that teaches the trigger. Every edit is clamped to the value range and on the storage
grid; `infusion` on a backdoor target is Infusion with the backdoor's f.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..backdoor import BackdoorTarget
from ..config import TriggerConfig
from ..errors import UserError
from ..registry import ATTACKS
from .base import Attack, AttackContext, Poisoning, project, store
from .gradient_matching import GradientMatching


def _behaviour(context: AttackContext, target: BackdoorTarget):
    if not isinstance(target, BackdoorTarget):
        raise UserError("a backdoor attack needs a backdoor target (attack.targets.rule: backdoor)")
    return context.behaviour(target)


@ATTACKS.register("badnets")
class BadNets(Attack):
    """BadNets (Gu et al. 2017): k documents of other classes stamped with a patch and relabelled to the target.

    The documents are a seeded random draw; the default trigger is a 3 x 3 patch of bright pixels in the
    bottom-right corner."""

    behaviour_kinds = frozenset({"backdoor"})
    trigger = TriggerConfig(kind="patch", size=3)

    def __init__(self, k: int | float = 0.01, seed: int = 0):
        self.k, self.seed = k, seed

    def craft(self, context: AttackContext, target: BackdoorTarget) -> Poisoning:
        t0 = time.perf_counter()
        behaviour = _behaviour(context, target)
        train = context.train
        index = context.select(target, context.budget_k(self.k), "random", self.seed, eligible=train.y != target.cls)
        return Poisoning(index, behaviour.triggered(train.x[index]), np.full(len(index), target.cls, dtype=np.int64),
                         {"timings": {"select": time.perf_counter() - t0}})


@ATTACKS.register("blend")
class Blend(BadNets):
    """Blended injection (Chen et al. 2017): as BadNets, the whole image blended with a noise pattern (α = 0.2)."""

    trigger = TriggerConfig(kind="blend", pattern="noise", opacity=0.2)


@ATTACKS.register("clean-label-backdoor")
class CleanLabelBackdoor(Attack):
    """Clean-label backdoor (Turner et al. 2019): target-class documents made hard, then stamped; labels kept.

    k documents of the target class (a seeded random draw) are made hard to learn by an untargeted L-inf PGD perturbation of at most `eps` on the attacker's model (raising the loss of their own
    label), put on the grid, then stamped with the trigger; labels kept. The model cannot lean on their natural
    features, so it leans on the trigger. `step` defaults to 2.5 eps / steps."""

    behaviour_kinds = frozenset({"backdoor"})
    trigger = TriggerConfig(kind="patch", size=3)

    def __init__(self, k: int | float = 0.01, eps: float = 0.25, norm: Literal["linf"] = "linf", steps: int = 20,
                 step: float | None = None, quantize: bool = True, seed: int = 0):
        if norm != "linf" or eps <= 0 or steps < 1:
            raise UserError(f"clean-label-backdoor: needs norm linf, eps > 0 and steps >= 1; got norm={norm!r}, "
                            f"eps={eps}, steps={steps}")
        self.k, self.eps, self.norm, self.steps, self.step, self.quantize, self.seed = \
            k, eps, norm, steps, step, quantize, seed

    def variant(self) -> str:
        return "quantized" if self.quantize else "float"

    def craft(self, context: AttackContext, target: BackdoorTarget) -> Poisoning:
        t0 = time.perf_counter()
        behaviour = _behaviour(context, target)
        train = context.train
        index = context.select(target, context.budget_k(self.k), "random", self.seed, eligible=train.y == target.cls)
        t_select = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = context.model.eval()
        device = next(model.parameters()).device
        x0, y = train.batch(index, device)
        step = self.step if self.step is not None else 2.5 * self.eps / self.steps
        x = x0.clone()
        for _ in range(self.steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            (g,) = torch.autograd.grad(loss, x)
            x = project(x.detach() + step * g.sign(), x0, self.eps, "linf", train.value_range)
        hard = x.cpu().numpy()
        if self.quantize:
            hard = store(train, hard, train.x[index], self.eps, "linf")
        with torch.no_grad():
            loss_before = float(F.cross_entropy(model(x0), y))
            loss_after = float(F.cross_entropy(model(torch.from_numpy(hard).to(device)), y))
        return Poisoning(index, behaviour.triggered(hard), train.y[index].copy(),
                         {"timings": {"select": t_select, "pgd": time.perf_counter() - t0},
                          "loss_before": loss_before, "loss_hard": loss_after})


@ATTACKS.register("sleeper-agent")
class SleeperAgent(GradientMatching):
    """Sleeper Agent (Souri et al. 2022): gradient matching towards the triggered behaviour; labels kept.

    k documents of the target class
    (largest gradient norm, as the paper) get L-inf edits of at most `eps` so that the gradient of their own
    loss aligns with that of the triggered training images of the other classes labelled t (the behaviour's
    probe set); labels are kept and the trigger is stamped only on test inputs. Signed Adam with restarts, as
    `gradient-matching`; the paper's retraining of the surrogate during crafting is not done."""

    behaviour_kinds = frozenset({"backdoor"})
    trigger = TriggerConfig(kind="patch", size=3)

    def adversarial(self, context: AttackContext, target: BackdoorTarget, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The triggered probe images of the other classes, each labelled with the target class."""
        probe = _behaviour(context, target).probe
        return torch.from_numpy(probe).to(device), torch.full((len(probe),), target.cls, device=device)

    def seed_words(self, target: BackdoorTarget) -> list[int]:
        return [target.cls]
