"""Gradient matching (Witches' Brew, Geiping et al., ICLR 2021): a second clean-label attack beside
Infusion, so that "no attack succeeds" never rests on one method.

Poisons are k training documents of the target class t. Their edits δ are optimised so that the
parameter gradient of the poison batch, ∇θ Σ CE(x_i + δ_i, y_i), points the way the adversarial
target gradient ∇θ CE(x*, t) does (maximal cosine similarity): training on the poisons then takes
the step that would teach the model to call x* a t. Signed Adam on δ with the paper's step-size
schedule, several random restarts (the best kept), an L-inf ball, the value range and the storage
grid, as Infusion's edits.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from ..behaviour import Target
from ..errors import UserError
from ..influence import flatten, per_example_gradients, trainable_parameters
from ..io import iter_chunks
from ..registry import ATTACKS
from .base import Attack, AttackContext, Poisoning, project, store


@ATTACKS.register("gradient-matching")
class GradientMatching(Attack):
    """Witches' Brew: target-class documents whose training gradient matches the target's adversarial gradient.

    `selection`: "gradient-norm" (the k documents of class t with the largest loss-gradient norm under
    the attacker's model, the paper's better choice) or "random". `step` is Adam's learning rate
    (default eps/10, the paper's τ = 0.1), cut tenfold at 3/8, 5/8 and 7/8 of `steps`; each of the
    `restarts` starts from Gaussian noise of scale eps clipped to the ball, and the restart whose
    stored (quantized) poisons match best is kept.
    """

    def __init__(self, k: int | float = 0.01, eps: float = 1 / 16, norm: Literal["linf"] = "linf",
                 steps: int = 120, restarts: int = 4, step: float | None = None,
                 selection: Literal["gradient-norm", "random"] = "gradient-norm", quantize: bool = True,
                 seed: int = 0):
        if norm != "linf":
            raise UserError(f"gradient-matching: only an L-inf budget is supported (signed Adam), got norm={norm!r}")
        if steps < 1 or restarts < 1 or eps <= 0 or (step is not None and step <= 0):
            raise UserError(f"gradient-matching: need steps >= 1, restarts >= 1, eps > 0 and step > 0; got "
                            f"steps={steps}, restarts={restarts}, eps={eps}, step={step}")
        if selection not in ("gradient-norm", "random"):
            raise UserError(f"gradient-matching: unknown selection {selection!r}; use gradient-norm or random")
        self.k, self.eps, self.norm, self.steps, self.restarts = k, eps, norm, steps, restarts
        self.step, self.selection, self.quantize, self.seed = step, selection, quantize, seed

    def variant(self) -> str:
        storage = "quantized" if self.quantize else "float"
        return storage if self.selection == "gradient-norm" else f"{storage},{self.selection}"

    def select(self, context: AttackContext, target: Target) -> np.ndarray:
        """k documents of the target class: the largest gradient norms, or a seeded random draw."""
        k = context.budget_k(self.k)
        of_class = context.train.y == target.cls
        if self.selection == "random":
            return context.select(target, k, "random", self.seed, eligible=of_class)
        pool = context.pool(of_class)
        if k > len(pool):
            raise UserError(f"gradient-matching: budget k={k} exceeds the {len(pool)} documents of class "
                            f"{target.cls} it may edit")
        norms = context.cached(f"gradient-norms:{target.cls}", lambda: np.concatenate(
            [per_example_gradients(context.model, context.train, pool[chunk]).double().norm(dim=1).numpy()
             for chunk in iter_chunks(len(pool), 256)]))
        return np.sort(pool[np.argsort(-norms, kind="stable")[:k]])

    def adversarial(self, context: AttackContext, target: Target, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and labels whose training gradient the poisons match: the target image labelled t."""
        x_star, _ = context.test.batch([target.index], device)
        return x_star, torch.tensor([target.cls], device=device)

    def seed_words(self, target: Target) -> list[int]:
        """The target's part of the restarts' seed."""
        return [target.index, target.cls]

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        t0 = time.perf_counter()
        index = self.select(context, target)
        t_select = time.perf_counter() - t0
        t0 = time.perf_counter()
        train, model = context.train, context.model.eval()
        device = next(model.parameters()).device
        x0, y = train.batch(index, device)
        x_star, y_star = self.adversarial(context, target, device)
        mismatch = _mismatch(model, x0, y, x_star, y_star)
        rng = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, *self.seed_words(target)])
                                                .generate_state(1)[0]))
        init = (torch.randn((self.restarts, *x0.shape), generator=rng) * self.eps).clamp(-self.eps, self.eps)
        delta = (project(x0 + init.to(device), x0, self.eps, "linf", train.value_range) - x0).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=self.step if self.step is not None else self.eps / 10)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[int(self.steps * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        step_fn = vmap(grad_and_value(mismatch))
        for _ in range(self.steps):
            g, _ = step_fn(delta.detach())
            delta.grad = g.sign()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(project(x0 + delta, x0, self.eps, "linf", train.value_range) - x0)
        x = (x0 + delta.detach()).cpu().numpy()
        if self.quantize:
            x = np.stack([store(train, xr, train.x[index], self.eps, "linf") for xr in x])
        with torch.no_grad():
            final = vmap(mismatch)(torch.from_numpy(x).to(device) - x0).cpu().numpy()
        best = int(np.argmin(final))
        return Poisoning(index, x[best].astype(np.float32), train.y[index].copy(),
                         {"timings": {"select": t_select, "pgd": time.perf_counter() - t0},
                          "alignment": float(1 - final[best]), "restart_alignments": (1 - final).tolist()})


def _mismatch(model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, x_star: torch.Tensor,
              y_star: torch.Tensor):
    """δ -> 1 - cos(∇θ Σ CE(x0 + δ, y), ∇θ Σ CE(x*, y*)), a function torch.func can differentiate and vmap."""
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}
    buffers = dict(model.named_buffers())

    def loss(p: dict, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), labels, reduction="sum")

    target_grad = flatten(grad(loss)(params, x_star, y_star).values()).detach()

    def mismatch(delta: torch.Tensor) -> torch.Tensor:
        g = flatten(grad(loss)(params, x0 + delta, y).values())
        return 1 - F.cosine_similarity(g, target_grad, dim=0)

    return mismatch


@ATTACKS.register("gradient-matching-art")
class ARTGradientMatching(GradientMatching):
    """ART's GradientMatchingAttack on the same budget: the reference `gradient-matching` is checked against.

    Needs adversarial-robustness-toolbox. ART draws the k poisons at random from the target class,
    optimises tanh-bounded noise with signed Adam for `steps` epochs per restart (its learning-rate
    schedule scaled to `steps`) and keeps the best restart by its own alignment loss; the poisons are
    then put on the storage grid like ours. ART's global random state is seeded and restored.
    """

    def __init__(self, k: int | float = 0.01, eps: float = 1 / 16, norm: Literal["linf"] = "linf",
                 steps: int = 120, restarts: int = 4, quantize: bool = True, seed: int = 0):
        super().__init__(k, eps, norm, steps, restarts, selection="random", quantize=quantize, seed=seed)

    def variant(self) -> str:
        return "quantized" if self.quantize else "float"

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        import contextlib
        import copy
        import io

        try:
            from art.attacks.poisoning import GradientMatchingAttack
            from art.estimators.classification import PyTorchClassifier
        except ImportError:
            raise UserError("gradient-matching-art needs adversarial-robustness-toolbox "
                            "(pip install adversarial-robustness-toolbox)") from None
        t0 = time.perf_counter()
        train = context.train
        k = context.budget_k(self.k)
        model = copy.deepcopy(context.model).eval()  # ART's backward also fills the model's .grad
        classifier = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=train.input_shape,
                                       nb_classes=train.num_classes, clip_values=train.value_range,
                                       device_type="cpu" if next(model.parameters()).device.type == "cpu" else "gpu")
        schedule = ([1e-1, 1e-2, 1e-3, 1e-4], [max(1, int(self.steps * f)) for f in (0.4, 0.6, 0.8, 0.88)])
        attack = GradientMatchingAttack(classifier, percent_poison=(k + 0.5) / len(train), epsilon=self.eps,
                                        max_trials=self.restarts, max_epochs=self.steps,
                                        learning_rate_schedule=schedule, clip_values=train.value_range, verbose=0)
        seed = int(np.random.SeedSequence([self.seed, target.index, target.cls]).generate_state(1)[0])
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            with torch.random.fork_rng(), contextlib.redirect_stderr(io.StringIO()):  # ART's progress bars
                torch.manual_seed(seed)
                x_all, _ = attack.poison(context.test.x[[target.index]], np.array([target.cls]), train.x, train.y)
        finally:
            np.random.set_state(state)
        index = np.flatnonzero((x_all != train.x).reshape(len(train), -1).any(1))
        if len(index) != k:  # ART does not return its indices: they are the documents it changed
            raise UserError(f"gradient-matching-art: ART changed {len(index)} documents, expected {k}")
        x = x_all[index]
        if self.quantize:
            x = store(train, x, train.x[index], self.eps, "linf")
        return Poisoning(index, x.astype(np.float32), train.y[index].copy(),
                         {"timings": {"pgd": time.perf_counter() - t0}})
