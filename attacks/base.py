"""What every attack plugin shares: the `Attack` base (params in __init__, one verb `craft`), the
`Poisoning` it returns, the budget's projection and storage grid (`project`, `store`), and the
`AttackContext` that computes expensive things once per pipeline (the attacked model, the IHVP solver
at each damping asked for, each target's IHVP and influence scores) so several attacks and budgets on
the same targets reuse them.
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from ..behaviour import Target, measurement_gradient
from ..errors import UserError
from ..io import stable_hash
from ..config import InfluenceConfig, TriggerConfig
from ..influence import IHVP, fit_ihvp, influence_scores
from ..influence.gradients import trainable_parameters
from ..pipeline import Pipeline, TrainedPipeline
from ..training import Checkpoint

Selection = Literal["most-negative", "most-absolute", "random", "most-positive"]
Curvature = Literal["influence", "adam"]


@dataclass
class Poisoning:
    """The edited documents: which ones (`indices`), their new content `x` and labels `y`, and `meta`
    (norms, timings, attack-specific diagnostics)."""

    indices: np.ndarray
    x: np.ndarray
    y: np.ndarray
    meta: dict = field(default_factory=dict)

    def apply(self, clean):
        """The poisoned training set: same size and order as `clean`, so the retrain replays its order."""
        return clean.with_documents(self.indices, self.x, self.y)

    def edits_in_place(self, clean) -> bool:
        """Whether each document stays itself (content edited, label kept): then its unedited counterpart exists."""
        return bool(np.array_equal(self.y, clean.y[self.indices]))

    def norms(self, clean) -> dict:
        """Mean L-inf, L2 and number of values changed over the edited documents, and how many values
        left the storage grid or the value range (what a defender could see)."""
        delta = (self.x - clean.x[self.indices]).reshape(len(self.indices), -1).astype(np.float64)
        lo, hi = clean.value_range
        out_of_range = int(((self.x < lo - 1e-6) | (self.x > hi + 1e-6)).sum())
        off_grid = 0
        if clean.grid:
            steps = (self.x.astype(np.float64) - lo) / clean.grid
            off_grid = int((np.abs(steps - np.round(steps)) > 1e-4).sum())
        return {"linf": float(np.abs(delta).max(1).mean()) if len(delta) else 0.0,
                "l2": float(np.linalg.norm(delta, axis=1).mean()) if len(delta) else 0.0,
                "values_changed": float((np.abs(delta) > 1e-7).sum(1).mean()) if len(delta) else 0.0,
                "off_grid": off_grid, "out_of_range": out_of_range}


def project(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str, value_range: tuple[float, float]) -> torch.Tensor:
    """Back into the eps-ball around x0 (L-inf or L2 per document) and the dataset's value range."""
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        size = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
        delta = delta * torch.clamp(eps / size, max=1.0)
    return (x0 + delta).clamp(*value_range)


def store(dataset, x: np.ndarray, x0: np.ndarray, eps: float, norm: str) -> np.ndarray:
    """Round edits to the dataset's storage grid (so they survive being saved in its own format),
    pulling any value that rounding pushed past an L-inf budget back one grid step."""
    q = dataset.quantize(x)
    if norm == "linf" and dataset.grid:
        limit = np.floor(eps / dataset.grid + 1e-6) * dataset.grid
        q = dataset.quantize(x0 + np.clip(q - x0, -limit, limit))
    return q


def target_key(target) -> str:
    """A target as text, for timing names and seeds (image or text targets alike)."""
    return json.dumps(target.as_dict(), sort_keys=True)


class AttackContext:
    """A trained pipeline as an attacker sees it at checkpoint `epoch`, with per-target caches. `probes`:
    how many test prompts a text behaviour is measured on; `progress`: whether attacks show progress bars;
    `documents`: the training documents the victim's retrain sees (a segment's; None: all), which selection
    picks from and a fractional k is a share of: an edit the retrain never sees would change nothing.
    `retrain_start`: a callable giving the checkpoint the victim's retrain starts from (its optimizer's state),
    which the `adam` curvature reads."""

    def __init__(self, pipeline: Pipeline, trained: TrainedPipeline, epoch: int | None = None,
                 influence: InfluenceConfig | None = None, cache_dir: str | Path | None = None,
                 ihvp_kwargs: dict | None = None, probes: int = 32, progress: bool = True,
                 documents: np.ndarray | None = None, retrain_start: Callable[[], Checkpoint | None] | None = None):
        self.pipeline, self.trained, self.probes, self.progress = pipeline, trained, probes, progress
        self.documents, self.retrain_start = documents, retrain_start
        self.epoch = len(trained.checkpoints) - 1 if epoch is None else epoch
        self.influence = influence or InfluenceConfig()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.ihvp_kwargs = dict(ihvp_kwargs or {})
        self.model: nn.Module = trained.model(self.epoch)
        self.timings: dict[str, float] = {}
        self._ihvps: dict[float, IHVP] = {}
        self._behaviours: dict = {}
        self._queries: dict[tuple, torch.Tensor] = {}
        self._scores: dict[tuple, np.ndarray] = {}
        self._shared: dict[str, object] = {}

    @property
    def train(self):
        return self.pipeline.data.train

    @property
    def test(self):
        return self.pipeline.data.test

    def budget_k(self, k: int | float) -> int:
        """A budget given as a count (14) or a fraction (0.01) of the documents a retrain sees."""
        n = len(self.train) if self.documents is None else len(self.documents)
        count = k if isinstance(k, int) else int(round(k * n))
        if not 1 <= count <= n:
            raise UserError(f"budget k={k} gives {count} documents; need 1..{n}")
        return count

    def ihvp(self, damping: float | None = None) -> IHVP:
        """The solver at the influence section's damping, or at an attack's own `damping` (a recipe tuned to
        another one): the curvature is fitted once, and each damping is a copy of that solver."""
        base, damping = self._damping(None), self._damping(damping)
        if base not in self._ihvps:
            t0 = time.perf_counter()
            self._ihvps[base] = fit_ihvp(self.influence, self.model, self.train, loss_fn=self.pipeline.loss,
                                         cache_dir=None if self.cache_dir is None else self.cache_dir / "factors",
                                         **self.ihvp_kwargs)
            self.timings["factors"] = time.perf_counter() - t0
        if damping not in self._ihvps:
            self._ihvps[damping] = copy.copy(self._ihvps[base])
            self._ihvps[damping].damping = damping
        return self._ihvps[damping]

    def _damping(self, damping: float | None) -> float:
        """An attack's own damping, else the influence section's: what the IHVP caches are keyed by."""
        return float(self.influence.damping if damping is None else damping)

    def behaviour(self, target: Target):
        """The pipeline's behaviour for this target (its measurement f and the figures records report)."""
        if target not in self._behaviours:
            behaviour = self.pipeline.behaviour(target, probes=self.probes)
            resolve = getattr(behaviour, "resolve", None)  # a learned trigger is learned on the attacker's model
            self._behaviours[target] = behaviour if resolve is None else resolve(self.model)
        return self._behaviours[target]

    def query(self, target: Target, damping: float | None = None, curvature: Curvature = "influence") -> torch.Tensor:
        """v = C^-1 grad f for this target, normalised to unit length (as the paper). Curvature `influence`:
        C = G + damping I, the influence function's (retraining to convergence; `damping`: an attack's own, default
        the influence section's). `adam`: C = diag(sqrt(v) + eps) from Adam's second moments at the victim's
        retrain start, so <grad L(doc), v> is, to first order, what one Adam step on the document does to f (a
        short retrain, the paper's last segment of training, is a few such steps rather than convergence)."""
        key = (target, self._damping(damping), curvature)
        if key not in self._queries:
            t0 = time.perf_counter()
            grad = measurement_gradient(self.model, self.behaviour(target))
            v = self.ihvp(damping).solve(grad) if curvature == "influence" else grad * self.adam_preconditioner()
            self._queries[key] = v / v.norm().clamp_min(1e-30)
            stage = "ihvp" if curvature == "influence" else "query"
            self.timings[f"{stage}:{target_key(target)}"] = time.perf_counter() - t0
        return self._queries[key]

    def adam_preconditioner(self) -> torch.Tensor:
        """1 / (sqrt(v) + eps) per trainable parameter, from Adam's state at the victim's retrain start."""
        def compute() -> torch.Tensor:
            start = None if self.retrain_start is None else self.retrain_start()
            state = {} if start is None else start.optimizer.get("state", {})
            if not state or "exp_avg_sq" not in next(iter(state.values())):
                raise UserError("curvature adam reads Adam's second moments where the victim's retrain starts: it needs "
                                "pipeline.train.optimizer adam and attack.protocol kind segment or continue")
            eps = float(start.optimizer["param_groups"][0]["eps"])
            sizes = [p.numel() for p in trainable_parameters(self.model).values()]
            second = [state[i]["exp_avg_sq"].reshape(-1).float() if i in state else torch.zeros(n)
                      for i, n in enumerate(sizes)]
            return 1 / (torch.cat(second).sqrt() + eps)

        return self.cached("adam", compute)

    def scores(self, target: Target, damping: float | None = None, curvature: Curvature = "influence") -> np.ndarray:
        """Scores s_i = <grad L_i, v> of every document a retrain sees (`pool()`) on this target's measurement (v as
        `query`); NaN for the others, which no attack edits."""
        key = (target, self._damping(damping), curvature)
        if key not in self._scores:
            t0 = time.perf_counter()
            pool, scores = self.pool(), np.full(len(self.train), np.nan)
            scores[pool] = influence_scores(self.model, self.train, self.query(target, damping, curvature), pool,
                                            loss_fn=self.pipeline.loss)
            self._scores[key] = scores
            self.timings[f"scores:{target_key(target)}"] = time.perf_counter() - t0
        return self._scores[key]

    def pool(self, eligible: np.ndarray | None = None) -> np.ndarray:
        """The indices an attack may edit: `eligible` (a mask; None: all) among the documents a retrain sees (a
        segment's, under `protocol: {kind: segment}`). Every selection draws from here."""
        mask = np.ones(len(self.train), bool) if eligible is None else np.asarray(eligible, bool)
        if self.documents is not None:
            mask = mask & np.isin(np.arange(len(self.train)), self.documents)
        return np.flatnonzero(mask)

    def select(self, target: Target, k: int, rule: Selection, seed: int, eligible: np.ndarray | None = None,
               damping: float | None = None, curvature: Curvature = "influence") -> np.ndarray:
        """The k documents an attack edits: by score (at `damping` and `curvature`, as `query`), or at random, from
        `pool(eligible)`."""
        pool = self.pool(eligible)
        if k > len(pool):
            raise UserError(f"budget k={k} exceeds the {len(pool)} documents this attack can edit")
        if rule == "random":
            where = [target.index, target.cls] if isinstance(target, Target) else [int(stable_hash(target.as_dict()), 16)]
            return np.sort(np.random.default_rng([seed, *where]).choice(pool, k, replace=False))
        s = self.scores(target, damping, curvature)[pool]
        key = {"most-negative": s, "most-positive": -s, "most-absolute": -np.abs(s)}.get(rule)
        if key is None:
            raise UserError(f"unknown selection {rule!r}; use most-negative, most-absolute, random or most-positive")
        return np.sort(pool[np.argsort(key, kind="stable")[:k]])

    def cached(self, key: str, compute):
        """Something target-independent an attack derives once per context (detector scores on the clean set)."""
        if key not in self._shared:
            t0 = time.perf_counter()
            self._shared[key] = compute()
            self.timings[key] = time.perf_counter() - t0
        return self._shared[key]

    def stage_seconds(self, target: Target) -> dict:
        """The shared stages' time spent for this target (IHVP solve or Adam query, scores)."""
        suffix = f":{target_key(target)}"
        return {name[:-len(suffix)]: s for name, s in self.timings.items() if name.endswith(suffix)}


class Attack:
    """Base of attack plugins: hyperparameters in __init__, `craft(context, target) -> Poisoning`.
    `data_kinds`: the kinds of data it edits ("image", "text"); `behaviour_kinds`: the behaviours it can induce
    ("targeted": a chosen input classified or completed a chosen way; "backdoor": a trigger and a target class);
    `trigger`: the trigger it plants for a backdoor target whose arm names none (None: the arm must name one)."""

    data_kinds = frozenset({"image"})
    behaviour_kinds = frozenset({"targeted"})
    trigger: TriggerConfig | None = None

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters
                if name != "self"}

    def variant(self) -> str:
        """A short label that tells this configuration apart in tables (e.g. quantized / float)."""
        return ""

    def craft(self, context: AttackContext, target: Target) -> Poisoning:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def accepted_params(cls: type, params: dict) -> dict:
    """The subset of `params` that `cls.__init__` takes (budget keys an attack has no use for are dropped)."""
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in params.items() if k in names}
