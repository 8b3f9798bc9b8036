"""Infusion: clean-label edits of k training documents, crafted by projected gradient ascent on each document's
effect on the target's measurement after the victim retrains (through the replayed retrain by default, or its
influence), and its presets."""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import torch

from ..behaviour import Target
from ..errors import UserError
from ..influence import input_gradient, loss_gradient
from ..registry import ATTACKS
from .base import Attack, AttackContext, Poisoning, Selection, project, store
from .unrolled import check_replayable, craft_unrolled, effective_eps, feasible_gain

log = logging.getLogger(__name__)


class _PresetDefault:
    """The default of a parameter a preset sets: the preset decides unless the parameter is given."""

    def __repr__(self) -> str:
        return "<preset>"


PRESET = _PresetDefault()

# Named recipes: each sets these parameters unless they are given.
PRESETS: dict[str, dict] = {
    # the paper's code: EK-FAC influence with damping 1e-8, 50 sign steps of 0.001, the most negative documents
    "paper": {"objective": "influence", "damping": 1e-8, "steps": 50, "step": 0.001, "selection": "most-negative",
              "rounds": 1, "screen": 0, "screen_steps": 0},
    # the influence recipe (the default before the unrolled one): the influence section's damping, 20 sign steps
    # of 2.5 eps / 20, the most negative documents
    "influence": {"objective": "influence", "damping": None, "steps": 20, "step": None,
                  "selection": "most-negative", "rounds": 1, "screen": 0, "screen_steps": 0},
    # replay the retrain and climb d f(theta_T) / d x (attacks/unrolled.py): the 400 documents of most first-order
    # gain get 5 PGD steps, and the k that gained most are edited (20 steps, on the storage grid)
    "unrolled": {"objective": "unrolled", "damping": None, "steps": 20, "step": None, "selection": "gain",
                 "rounds": 1, "screen": 400, "screen_steps": 5},
}
SELECTIONS = {"influence": ("most-negative", "most-absolute", "random", "most-positive", "gain"),
              "unrolled": ("gain", "most-negative", "random")}


@ATTACKS.register("infusion")
class Infusion(Attack):
    """Clean-label edits of k training documents that raise the target's f after the victim retrains (Infusion):
    PGD on each document's effect on f, by default through the replayed retrain (the unrolled preset), else
    through its EK-FAC influence. On a backdoor target it raises the backdoor's f (the triggered images'
    log p(target)): the trigger is never stamped on a training document, only on test inputs.

    `preset` names a recipe (PRESETS: paper, influence, unrolled; by default `default_preset`) that sets
    `objective`, `damping`, `steps`, `step`, `selection`, `rounds`, `screen` and `screen_steps` unless they are
    given. `objective`: influence (ascend each document's EK-FAC influence, at `damping` if given, else the
    influence section's) or unrolled (replay the retrain from the checkpoint `unroll_epochs` before the attacked
    one and ascend each document's exact first-order effect on the retrained f; `rounds` > 1 re-linearises around
    the poisoned retrain; `orders` > 0: an attacker who does not know the data order sums over that many orders
    of its own; `surrogates` > 0: one who knows neither the initialisation nor the order also trains that many
    models of the same recipe under seeds of its own and sums over each one's retrain). `keep_accuracy` (mu,
    unrolled only) ascends f less mu times the clean training loss's gradient at f's norm: less collateral
    damage to accuracy, at a cost in effect (README). `selection: gain` edits the
    documents whose edit buys most to first order within the budget; `screen` > 0 gives that many candidates
    `screen_steps` PGD steps and keeps the k that gained most. `fallback`: where the retrain cannot be replayed
    (Adam, momentum, BatchNorm, a pipeline's own loop), the unrolled objective falls back to the influence preset
    (logged, and said in the poisoning's meta) instead of refusing.
    """

    behaviour_kinds = frozenset({"targeted", "backdoor"})
    default_preset = "unrolled"  # the strongest measured (README); a subclass that needs another names its own

    def __init__(self, k: int | float = 0.01, eps: float = 1 / 16, norm: Literal["linf", "l2"] = "linf",
                 step: float | None = PRESET, steps: int = PRESET, selection: Selection | Literal["gain"] = PRESET,
                 quantize: bool = True, batch_size: int = 256, seed: int = 0,
                 preset: Literal["paper", "influence", "unrolled"] | None = None,
                 objective: Literal["influence", "unrolled"] = PRESET, damping: float | None = PRESET,
                 rounds: int = PRESET, screen: int = PRESET, screen_steps: int = PRESET, unroll_epochs: int = 1,
                 orders: int = 0, surrogates: int = 0, fallback: bool = True, keep_accuracy: float = 0.0):
        preset = self.default_preset if preset is None else preset
        if preset not in PRESETS:
            raise UserError(f"infusion: unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        given = {"step": step, "steps": steps, "selection": selection, "objective": objective, "damping": damping,
                 "rounds": rounds, "screen": screen, "screen_steps": screen_steps}
        for name, value in given.items():
            setattr(self, name, PRESETS[preset][name] if value is PRESET else value)
        self.k, self.eps, self.norm, self.quantize, self.batch_size, self.seed = k, eps, norm, quantize, batch_size, seed
        self.preset, self.unroll_epochs, self.orders, self.fallback = preset, unroll_epochs, orders, fallback
        self.keep_accuracy, self.surrogates = keep_accuracy, surrogates
        self._check()

    def _check(self) -> None:
        """Each bad parameter refused in one line that names it."""
        if self.objective not in SELECTIONS:
            raise UserError(f"infusion: objective must be influence or unrolled, got {self.objective!r}")
        if self.selection not in SELECTIONS[self.objective]:
            raise UserError(f"infusion: selection {self.selection!r} with objective {self.objective}; use one of "
                            f"{', '.join(SELECTIONS[self.objective])}")
        if self.damping is not None and not (isinstance(self.damping, (int, float)) and self.damping > 0):
            raise UserError(f"infusion: damping must be a number > 0 (or null: the influence section's), "
                            f"got {self.damping!r}")
        if not (isinstance(self.rounds, int) and 1 <= self.rounds <= self.steps):
            raise UserError(f"infusion: rounds must lie in 1..steps ({self.steps}), got {self.rounds!r}")
        for name, low in (("screen", 0), ("screen_steps", 0), ("orders", 0), ("surrogates", 0), ("unroll_epochs", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= low):
                raise UserError(f"infusion: {name} must be a whole number >= {low}, got {value!r}")
        if not (isinstance(self.keep_accuracy, (int, float)) and self.keep_accuracy >= 0):
            raise UserError(f"infusion: keep_accuracy must be a number >= 0, got {self.keep_accuracy!r}")
        for name in ("keep_accuracy", "surrogates"):
            if getattr(self, name) and self.objective != "unrolled":
                raise UserError(f"infusion: {name} with objective {self.objective}; it acts on the unrolled "
                                f"objective only")
        if self.norm != "linf" and (self.objective == "unrolled" or self.selection == "gain"):
            raise UserError(f"infusion: norm {self.norm!r} with objective {self.objective}, selection "
                            f"{self.selection}; the unrolled objective and selection gain take norm linf only "
                            f"(preset influence takes l2)")

    def variant(self) -> str:
        """The arm's label: the storage, the preset unless it is this attack's default, and every parameter set
        away from its preset, so that two arms of one run never share a label."""
        parts = ["quantized" if self.quantize else "float"]
        if self.preset != self.default_preset:
            parts.append(self.preset)
        for name, preset_value in PRESETS[self.preset].items():
            value = getattr(self, name)
            if value != preset_value:
                parts.append(value if name in ("objective", "selection") else
                             f"{name}={'default' if value is None else format(value, 'g')}")
        parts += [f"{name}={getattr(self, name):g}" for name, plain in
                  (("orders", 0), ("surrogates", 0), ("unroll_epochs", 1), ("keep_accuracy", 0.0))
                  if getattr(self, name) != plain]
        return ",".join(parts)

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        if self.objective == "unrolled":
            return self._craft_unrolled(context, target)
        v = context.query(target, self.damping)
        if self.selection not in ("random", "gain"):
            context.scores(target, self.damping)  # timed as its own (per-target, shared) stage
        t0 = time.perf_counter()
        if self.selection == "gain":
            index = self._select_by_gain(context, v, context.budget_k(self.k))
        else:
            index = context.select(target, context.budget_k(self.k), self.selection, self.seed,
                                   eligible=self._eligible(context), damping=self.damping)
        t_select = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = context.train
        x0_all, y_all = train.batch(index)
        crafted = [self._pgd(context, v, x0_all[s:s + self.batch_size], y_all[s:s + self.batch_size])
                   for s in range(0, len(index), self.batch_size)]
        x = torch.cat(crafted).cpu().numpy()
        if self.quantize:
            x = store(train, x, train.x[index], self.eps, self.norm)
        t_pgd = time.perf_counter() - t0
        predicted = self._predicted_delta_f(context, v, x, index)
        return Poisoning(index, x.astype(np.float32), train.y[index].copy(),
                         {"timings": {**context.stage_seconds(target), "select": t_select, "pgd": t_pgd},
                          "predicted_delta_f": predicted})

    def _craft_unrolled(self, context: AttackContext, target: Target) -> Poisoning:
        """The unrolled objective (attacks/unrolled.py), or, where the pipeline's retrain cannot be replayed and
        `fallback` allows, this attack under the influence preset (the preset's parameters reset)."""
        try:
            check_replayable(context.pipeline)
        except UserError as exc:
            if not self.fallback:
                raise
            log.warning("infusion: %s; using the influence objective (preset 'influence') instead", exc)
            params = {**self.get_params(), **{name: PRESET for name in PRESETS["influence"]}, "preset": "influence",
                      "keep_accuracy": 0.0, "surrogates": 0}
            poisoning = type(self)(**params).craft(context, target)
            poisoning.meta["fallback"] = f"influence ({exc})"
            return poisoning
        return craft_unrolled(self, context, target)

    def _pgd(self, context: AttackContext, v: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        step = self.step if self.step is not None else 2.5 * self.eps / self.steps
        n = len(context.train)
        device = next(context.model.parameters()).device
        x0, y, v = x0.to(device), y.to(device), v.to(device)  # once, not at every step
        x = x0.clone()
        for _ in range(self.steps):
            g = self._ascent(context, v, x, y, n)
            if self.norm == "linf":
                x = x + step * g.sign()
            else:
                x = x + step * g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
            x = project(x, x0, self.eps, self.norm, context.train.value_range)
        return x.detach()

    def _select_by_gain(self, context: AttackContext, v: torch.Tensor, k: int) -> np.ndarray:
        """The k documents whose edit can buy most to first order: the feasible L-inf gain of each document's
        ascent direction at its clean point (sum over values of |G| times the room the ball and range leave)."""
        train = context.train
        pool = context.pool(self._eligible(context))
        device = next(context.model.parameters()).device
        grads = []
        for s in range(0, len(pool), self.batch_size):
            x, y = train.batch(pool[s:s + self.batch_size], device)
            grads.append(self._ascent(context, v.to(device), x, y, len(train)).cpu().numpy())
        gain = feasible_gain(np.concatenate(grads), train.x[pool], effective_eps(self.eps, train, self.quantize),
                             train.value_range)
        return np.sort(pool[np.argsort(-gain, kind="stable")[:k]])

    def _eligible(self, context: AttackContext) -> np.ndarray | None:
        """Which documents may be chosen (a mask; None: all). Subclasses narrow it (detector-aware selection)."""
        return None

    def _ascent(self, context: AttackContext, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                n: int) -> torch.Tensor:
        """The direction PGD climbs from documents x: the input-gradient of their influence on f."""
        return input_gradient(context.model, x, y, v, n)

    @staticmethod
    def _predicted_delta_f(context: AttackContext, v: torch.Tensor, x: np.ndarray, index: np.ndarray) -> float:
        """First-order change of f (unit-norm v, so in arbitrary units): -(1/n) v^T sum_j [grad L(x'_j) - grad L(x_j)]."""
        train, model = context.train, context.model
        k, device = len(index), next(model.parameters()).device
        before = loss_gradient(model, train.batch(index, device)) * k
        after = loss_gradient(model, (torch.from_numpy(x).to(device), torch.from_numpy(train.y[index]).to(device))) * k
        return float(-(v @ (after - before).cpu()) / len(train))
