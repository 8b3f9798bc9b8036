"""Unrolled retraining: the attacker replays the victim's retrain (plain SGD from a checkpoint, in the data
order the pipeline fixes) and back-propagates the measurement through it, which gives, for every training
document, the exact first-order effect of editing it on f(theta_T); no inverse Hessian is involved.

Notation: theta_0 is the checkpoint the retrain starts from; step s (0-based) takes batch B_s at theta_s,
theta_{s+1} = theta_s - lr_s (grad L_{B_s}(theta_s) + wd theta_s), T steps in all. The adjoint u_s = d f(theta_T) /
d theta_s runs backwards from u_T = grad f(theta_T) by u_s = (1 - lr_s wd) u_{s+1} - lr_s H_s u_{s+1} (H_s the
Hessian of the batch's mean loss at theta_s: one Hessian-vector product per step). A document j in B_s
enters theta_{s+1} through -(lr_s / |B_s|) grad_theta L(x_j; theta_s), so

    d f(theta_T) / d x_j = -(lr_s / |B_s|) d/dx_j [ u_{s+1}^T grad_theta L(x_j; theta_s) ]

summed over the steps that see j (one per epoch replayed). Along the clean trajectory this is the first-order
effect of an edit; replayed on the poisoned set it is the exact gradient of the retrained f with respect to
every poisoned document (the re-linearised rounds of the attack).

The replay covers what the built-in recipe does with SGD without momentum (weight decay and a per-epoch
learning-rate schedule included); anything else (momentum, Adam, clipping, augmentation, bf16) is refused in
one line, since the replay would not be the victim's retrain.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from ..behaviour import measurement_gradient
from ..errors import UserError
from ..influence import flatten, trainable_parameters, unflatten
from ..pipeline import Pipeline
from ..training import Checkpoint, epoch_lrs, epoch_order
from .base import Poisoning, project, store


@dataclass
class Step:
    """One SGD step of the replay: its batch and learning rate."""

    index: np.ndarray  # the documents of the batch, in the order the loop takes them
    lr: float


@dataclass
class Trajectory:
    """theta_s before every step s (flat, CPU float32), the steps, and theta_T."""

    thetas: list[torch.Tensor]
    steps: list[Step]
    final: torch.Tensor
    # document -> the steps that see it
    visits: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.visits:
            for s, step in enumerate(self.steps):
                for j in step.index:
                    self.visits.setdefault(int(j), []).append(s)


def check_replayable(pipeline) -> None:
    """Refuse a recipe the replay would not reproduce (one line)."""
    cfg = pipeline.train_cfg
    problems = []
    if type(pipeline).fit is not Pipeline.fit:
        problems.append("its own training loop")
    if type(pipeline).loss is not Pipeline.loss:  # the per-document terms below are cross-entropy
        problems.append("its own loss")
    if cfg.optimizer != "sgd" or cfg.momentum:
        problems.append(f"optimizer {cfg.optimizer}" + (f" with momentum {cfg.momentum}" if cfg.momentum else ""))
    if cfg.clip_grad_norm is not None:
        problems.append("gradient clipping")
    if cfg.augment:
        problems.append("augmentation")
    if cfg.precision != "fp32":
        problems.append(f"precision {cfg.precision}")
    model = pipeline.new_model()
    stateful = sorted({type(m).__name__ for m in model.modules()
                       if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))})
    if stateful:
        problems.append(f"a model with {' and '.join(stateful)} (documents interact in a batch, or randomness)")
    if problems:
        raise UserError("unrolled retraining replays plain SGD (fp32, no momentum, clipping or augmentation) of a "
                        f"model without BatchNorm or dropout; this pipeline trains with {', '.join(problems)}")


class _Functional:
    """The pipeline's model and loss as functions of a flat parameter vector."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        self.model = model
        self.buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        self.loss_fn = loss_fn

    def params(self, theta: torch.Tensor, requires_grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A leaf copy of theta and the model's parameters as views of it."""
        leaf = theta.detach().clone().requires_grad_(requires_grad)
        return leaf, unflatten(self.model, leaf)

    def logits(self, pdict: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, ({**pdict}, self.buffers), (x,))

    def loss(self, pdict: dict, batch) -> torch.Tensor:
        """The pipeline's mean batch loss at parameters pdict."""
        model = self.model

        class _Bound(nn.Module):
            def forward(_, x):  # noqa: N805
                return functional_call(model, (pdict, self.buffers), (x,))

        return self.loss_fn(_Bound(), batch)


class Replay:
    """The victim's retrain as the attacker replays it: `epochs` epochs of the pipeline's SGD from checkpoint
    `start` over a (clean or poisoned) training set, in the pipeline's order."""

    def __init__(self, pipeline, start: Checkpoint, epochs: int = 1, device: str | torch.device = "cpu",
                 order_seed: int | None = None):
        check_replayable(pipeline)
        self.pipeline, self.start, self.epochs, self.order_seed = pipeline, start, epochs, order_seed
        self.device = torch.device(device)
        self.model = pipeline.model_at(start).to(self.device)
        self.model.train()  # as the training loop runs it (no BatchNorm or dropout in the models replayed here)
        self.fn = _Functional(self.model, pipeline.loss)
        self.theta0 = flatten([p.detach() for p in trainable_parameters(self.model).values()]).clone()
        self.lrs = epoch_lrs(pipeline.train_cfg)
        self.wd = pipeline.train_cfg.weight_decay
        self.batch_size = pipeline.train_cfg.batch_size

    def run(self, dataset) -> Trajectory:
        """Forward: theta before every step, on `dataset` (the same size and order as the training set)."""
        theta = self.theta0.clone()
        thetas, steps = [], []
        first = self.start.epoch
        for epoch in range(first, first + self.epochs):
            lr = self.lrs[min(epoch, len(self.lrs) - 1)]
            order = self.order(dataset, epoch)
            for s in range(0, len(order), self.batch_size):
                index = order[s:s + self.batch_size]
                thetas.append(theta.cpu())
                leaf, pdict = self.fn.params(theta, requires_grad=True)
                loss = self.fn.loss(pdict, dataset.batch(index, self.device))
                (g,) = torch.autograd.grad(loss, [leaf])
                theta = theta - lr * (g + self.wd * theta) if self.wd else theta - lr * g
                steps.append(Step(np.asarray(index), lr))
        return Trajectory(thetas, steps, theta.detach().cpu())

    def order(self, dataset, epoch: int) -> np.ndarray:
        """The pipeline's order, or with `order_seed` the order the same recipe would take under that seed (an
        attacker who does not know the victim's order replays several of these)."""
        if self.order_seed is None:
            return self.pipeline.order(dataset, epoch)
        return epoch_order(dataset, dataclasses.replace(self.pipeline.train_cfg, seed=self.order_seed), epoch)

    def model_at(self, theta: torch.Tensor) -> nn.Module:
        """A copy of the model holding parameters theta (eval mode), e.g. to measure f at theta_T."""
        model = copy.deepcopy(self.model)
        torch.nn.utils.vector_to_parameters(theta.to(self.device), [p for p in trainable_parameters(model).values()])
        return model.eval()

    def adjoint(self, traj: Trajectory, dataset, u_final: torch.Tensor, keep: set[int] | None = None,
                score: bool = False) -> "Adjoint":
        """Backward through the trajectory from u_T = u_final. Returns, for every document, the input-gradient
        d f / d x_j at its clean point (summed over its visits) and, with `score`, its unrolled influence
        u_{s+1}^T grad L(x_j; theta_s) scaled by -(lr/|B|) (the change of f per unit up-weighting); and
        u_{s+1} of the steps in `keep` (all steps when None) for later PGD on those steps' documents."""
        u = u_final.detach().to(self.device).clone()
        n = len(dataset)
        gx = torch.zeros((n, *dataset.input_shape), dtype=torch.float32)
        upweight = np.zeros(n)
        kept: dict[int, torch.Tensor] = {}
        for s in range(len(traj.steps) - 1, -1, -1):
            step = traj.steps[s]
            if keep is None or s in keep:
                kept[s] = u.cpu().clone()
            theta = traj.thetas[s].to(self.device)
            x, y = dataset.batch(step.index, self.device)
            x = x.detach().clone().requires_grad_(True)
            leaf, pdict = self.fn.params(theta, requires_grad=True)
            b = len(step.index)
            loss_sum = self.fn.loss(pdict, (x, y)) * b
            (g,) = torch.autograd.grad(loss_sum, [leaf], create_graph=True)
            dot = (g * u).sum()
            hu, gxs = torch.autograd.grad(dot, [leaf, x])
            gx[torch.as_tensor(step.index)] += (-(step.lr / b) * gxs).detach().cpu()
            if score:
                upweight[step.index] += -(step.lr / b) * self.document_directional(theta, (x.detach(), y), u)
            u = u - step.lr * (hu.detach() / b + self.wd * u)
        return Adjoint(gx.numpy(), upweight, kept)

    def document_directional(self, theta: torch.Tensor, batch, u: torch.Tensor) -> np.ndarray:
        """u^T grad_theta L(x_j; theta) for each document of a batch (forward mode; documents do not interact)."""
        x, y = batch
        _, pdict = self.fn.params(theta)
        tangents = unflatten(self.model, u.to(theta.dtype))

        def losses(p):
            return F.cross_entropy(self.fn.logits(p, x), y, reduction="none")

        with torch.no_grad():
            _, d = jvp(losses, (pdict,), (tangents,))
        return d.double().cpu().numpy()

    def document_gradient(self, theta: torch.Tensor, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """d/dx_j of scale * u^T grad_theta L(x_j; theta) for documents x (they do not interact): with theta = theta_s,
        u = u_{s+1} and scale = -lr_s/|B_s|, the first-order effect on f(theta_T) of document j's content at step s."""
        x = x.detach().clone().requires_grad_(True)
        leaf, pdict = self.fn.params(theta.to(self.device), requires_grad=True)
        per_doc = F.cross_entropy(self.fn.logits(pdict, x), y, reduction="none")
        (g,) = torch.autograd.grad(per_doc.sum(), [leaf], create_graph=True)
        (gx,) = torch.autograd.grad((g * u.to(self.device)).sum(), [x])
        return scale * gx.detach()


@dataclass
class Adjoint:
    input_gradient: np.ndarray  # (N, ...) d f / d x_j at the replayed data
    upweight: np.ndarray  # (N,) -(lr/|B|) u^T grad L_j summed over visits (0 unless scored)
    u: dict[int, torch.Tensor]  # step -> u_{s+1}


def feasible_gain(grad: np.ndarray, x0: np.ndarray, eps: float, value_range: tuple[float, float] = (0.0, 1.0)
                  ) -> np.ndarray:
    """Per document, the largest first-order gain sum_p grad_p delta_p over the L-inf ball of radius eps
    intersected with the value range: what an edit of that document can buy, to first order."""
    lo, hi = value_range
    up = np.minimum(eps, hi - x0)
    down = np.minimum(eps, x0 - lo)
    gain = np.where(grad > 0, grad * up, -grad * down)
    return gain.reshape(len(grad), -1).sum(1)


# --------------------------------------------------------------------------- the attack's use of the replay
def replay_for(context, epochs: int = 1, order_seed: int | None = None,
               surrogate_seed: int | None = None) -> tuple[Replay, Trajectory]:
    """The context's replay of the last `epochs` epochs of training (from the checkpoint `epochs` before the
    attacked one) and its clean trajectory, computed once per context. With `surrogate_seed`: the same for a
    model of the recipe that the attacker trains itself under that seed (its own initialisation and data order)
    and replays in its own order; summing over several stands in for a victim whose initialisation and order
    the attacker cannot know (it retrains from scratch under a seed of its own)."""
    start_epoch = context.epoch - epochs
    if start_epoch < 0:
        raise UserError(f"infusion: unroll_epochs={epochs} would replay from before epoch 0 (the attacked "
                        f"checkpoint is epoch {context.epoch})")

    def build():
        device = next(context.model.parameters()).device
        if surrogate_seed is None:
            pipeline, start = context.pipeline, context.trained.checkpoint(start_epoch)
        else:
            config = dataclasses.replace(context.pipeline.config,
                                         train=dataclasses.replace(context.pipeline.train_cfg, seed=surrogate_seed))
            pipeline = Pipeline.from_config(config, data=context.pipeline.data)
            start = Checkpoint.capture(start_epoch, pipeline.fit(pipeline.new_model(), context.train,
                                                                 until_epoch=start_epoch), None)
        replay = Replay(pipeline, start, epochs, device, order_seed)
        return replay, replay.run(context.train)

    return context.cached(f"unrolled-replay:{start_epoch}:{epochs}:{order_seed}:{surrogate_seed}", build)


def final_gradient(replay: Replay, traj: Trajectory, behaviour, clean=None, keep_accuracy: float = 0.0,
                   seed: int = 0) -> torch.Tensor:
    """grad_theta at the end of a replayed trajectory (flat, CPU) of what the attack ascends: f, less
    `keep_accuracy` times the gradient of the mean loss on up to 1,024 `clean` training documents scaled to f's
    gradient's norm, so that edits move f while leaving the clean loss flat (to first order)."""
    g = measurement_gradient(replay.model_at(traj.final), behaviour)
    if not keep_accuracy:
        return g
    index = np.sort(np.random.default_rng(seed).choice(len(clean), min(1024, len(clean)), replace=False))
    leaf, pdict = replay.fn.params(traj.final.to(replay.device), requires_grad=True)
    (loss_gradient,) = torch.autograd.grad(replay.fn.loss(pdict, clean.batch(index, replay.device)), [leaf])
    loss_gradient = loss_gradient.detach().cpu()
    return g - keep_accuracy * g.norm() / loss_gradient.norm().clamp_min(1e-30) * loss_gradient


def documents_ascent(replay: Replay, traj: Trajectory, adjoint: Adjoint, index: np.ndarray, x: torch.Tensor,
                     y: torch.Tensor, value: bool = False) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
    """d f / d x_j for documents `index` at contents x (their positions in the replayed steps fixed), summed over
    the steps that see each one: the ascent direction of unrolled PGD. With `value`, also each document's
    objective sum_visits -(lr/|B|) u_{s+1}^T grad L(x_j; theta_s) (for comparing edits)."""
    out = torch.zeros_like(x)
    vals = np.zeros(len(index))
    groups: dict[int, list[int]] = {}
    for row, j in enumerate(index):
        for s in traj.visits[int(j)]:
            groups.setdefault(s, []).append(row)
    for s, rows in groups.items():
        step = traj.steps[s]
        rows_t = torch.as_tensor(rows, device=x.device)
        scale = -step.lr / len(step.index)
        out[rows_t] += replay.document_gradient(traj.thetas[s], adjoint.u[s], x[rows_t], y[rows_t], scale)
        if value:
            vals[rows] += scale * replay.document_directional(traj.thetas[s].to(replay.device),
                                                              (x[rows_t], y[rows_t]), adjoint.u[s])
    return (out, vals) if value else out


def effective_eps(eps: float, dataset, quantize: bool) -> float:
    """The L-inf budget an edit can use once stored on the dataset's grid (e.g. 0.05 -> 12/255)."""
    if quantize and dataset.grid:
        return float(np.floor(eps / dataset.grid + 1e-6) * dataset.grid)
    return eps


def craft_unrolled(attack, context, target):
    """Infusion with `objective: unrolled`: select documents and climb d f(theta_T) / d x_j through the replayed
    retrain (see the module docstring); `rounds` > 1 replays the retrain on the current poisoned set between
    rounds of PGD, so later steps follow the exact gradient of the retrained f. `orders` > 0: the attacker does
    not know the order and sums the objective over that many orders of its own drawing. (Infusion has checked
    the L-inf budget and the selection rule.)"""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    seeds = [None] if not attack.orders else [10_000 + 100 * attack.seed + m for m in range(attack.orders)]
    replays = [replay_for(context, attack.unroll_epochs, order_seed=o) for o in seeds]
    replays += [replay_for(context, attack.unroll_epochs, surrogate_seed=20_000 + 100 * attack.seed + m)
                for m in range(attack.surrogates)]
    timings["replay"] = time.perf_counter() - t0
    train, behaviour = context.train, context.behaviour(target)
    k = context.budget_k(attack.k)
    eps = effective_eps(attack.eps, train, attack.quantize)
    t0 = time.perf_counter()
    def ascended(replay, traj):
        return final_gradient(replay, traj, behaviour, train, attack.keep_accuracy, attack.seed)

    clean_views = [(replay, traj, replay.adjoint(traj, train, ascended(replay, traj),
                                                 score=attack.selection == "most-negative"))
                   for replay, traj in replays]
    timings["adjoint"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eligible = attack._eligible(context)
    pool = context.pool(eligible)
    if attack.selection == "random":
        index = context.select(target, k, "random", attack.seed, eligible=eligible)
    else:
        if attack.selection == "gain":
            grad = sum(adj.input_gradient[pool] for _, _, adj in clean_views)
            key = feasible_gain(grad, train.x[pool], eps, train.value_range)
        else:  # most-negative: the most helpful up-weighting, the unrolled influence score
            key = sum(adj.upweight[pool] for _, _, adj in clean_views)
        order = pool[np.argsort(-key, kind="stable")]
        if attack.screen and attack.screen_steps:
            candidates = np.sort(order[:max(attack.screen, k)])
            _, gained = _pgd(attack, clean_views, train, candidates, eps, attack.screen_steps, want_gain=True)
            index = np.sort(candidates[np.argsort(-gained, kind="stable")[:k]])
        else:
            index = np.sort(order[:k])
    timings["select"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x0 = train.x[index]
    x = torch.from_numpy(x0.copy())
    per_round = [attack.steps // attack.rounds + (1 if r < attack.steps % attack.rounds else 0)
                 for r in range(attack.rounds)]
    views = clean_views
    for r, steps in enumerate(per_round):
        if r > 0:  # re-linearise: the retrain replayed on the current poisoned set
            poisoned = train.with_documents(index, x.numpy())
            views = []
            for replay, _ in replays:
                traj = replay.run(poisoned)
                needed = {s for j in index for s in traj.visits[int(j)]}
                views.append((replay, traj, replay.adjoint(traj, poisoned, ascended(replay, traj),
                                                           keep=needed)))
        x = _pgd(attack, views, train, index, eps, steps, start=x, total=attack.steps)
    x = x.numpy()
    if attack.quantize:
        x = store(train, x, x0, attack.eps, attack.norm)
    timings["pgd"] = time.perf_counter() - t0
    y = torch.from_numpy(train.y[index])
    _, before = views_ascent(clean_views, index, torch.from_numpy(x0), y, value=True)
    _, after = views_ascent(clean_views, index, torch.from_numpy(x), y, value=True)
    return Poisoning(index, x.astype(np.float32), train.y[index].copy(),
                     {"timings": timings, "predicted_delta_f": float((after - before).sum()) / len(clean_views)})


def views_ascent(views, index, x, y, value=False):
    """`documents_ascent` summed over replays (several orders), each a (replay, trajectory, adjoint)."""
    results = [documents_ascent(replay, traj, adj, index, x, y, value=value) for replay, traj, adj in views]
    if not value:
        return sum(results)
    return sum(g for g, _ in results), sum(v for _, v in results)


def default_step(attack, train, eps: float, steps: int) -> float:
    """Whole grid steps when the grid is fine against the budget (every iterate then stays on the storage grid:
    nothing is lost to rounding), as many as reach the budget's edge within `steps`; else Infusion's 2.5 eps / steps."""
    if attack.quantize and train.grid and train.grid <= eps / 4:
        return float(train.grid * np.ceil(eps / train.grid / max(steps, 1) - 1e-6))
    return 2.5 * eps / max(steps, 1)


def _pgd(attack, views, train, index, eps, steps, start=None, want_gain=False, total=None):
    """Sign-gradient ascent of each document's unrolled objective inside its L-inf ball and the value range.
    With `want_gain`: also each document's first-order gain (objective after minus before)."""
    step = attack.step if attack.step is not None else default_step(attack, train, eps, total or steps)
    x0 = torch.from_numpy(train.x[index].copy())
    y = torch.from_numpy(train.y[index])
    x = x0.clone() if start is None else start.clone()
    out = []
    for s in range(0, len(index), attack.batch_size):
        sl = slice(s, s + attack.batch_size)
        xb = x[sl]
        for _ in range(steps):
            g = views_ascent(views, index[sl], xb, y[sl])
            xb = project(xb + step * g.sign(), x0[sl], eps, "linf", train.value_range)
        out.append(xb)
    x = torch.cat(out) if out else x
    if not want_gain:
        return x
    _, before = views_ascent(views, index, x0, y, value=True)
    _, after = views_ascent(views, index, x, y, value=True)
    return x, after - before
