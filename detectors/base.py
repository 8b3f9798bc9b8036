"""The detector interface and the audit context that computes shared, expensive things once.

A detector is a small estimator in the scikit-learn style: its parameters go in ``__init__``,
``score(context)`` gives every document a suspicion score (higher = more suspicious) and
``flag(scores, context)`` applies its removal rule. It declares in ``needs`` what the defender must
have (the data, a model trained on it, a trusted reference copy, the suspicious behaviour); the
runner skips a detector whose needs are not met and says what would enable it.

The context is the part the library computes: penultimate features, logits, losses, per-example
gradients and the inverse-Hessian solver are each computed on first use and cached, so five
detectors that read features pay for one forward pass. The model is taken as it is: features come
from a hook (see ``features.FeatureExtractor``), and a detector asks only for what it reads
("logits", "features", ...), so one that needs features is skipped, with the reason, on a model
they cannot be taken from while the others still run. A caller that already holds some of these
(a text pipeline, a benchmark that kept them) hands them in with ``provide``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from infusion_audit.config import InfluenceConfig, from_dict
from infusion_audit.errors import DataError, PluginError, first_line
from infusion_audit.io import iter_chunks
from infusion_audit.runtime import model_device

from .features import FeatureExtractor

log = logging.getLogger(__name__)
# Why a detector did not run or failed; a benchmark silences it per cell and logs each reason once per run.
SKIP_LOG = logging.getLogger(f"{__name__}.skipped")

# What each need is, in words a user can act on.
ENABLE_HINTS = {
    "model": "a model trained on the suspect data",
    "logits": "a model trained on the suspect data that outputs one row of class scores per document",
    "losses": "per-document losses, from a model trained on the suspect data that outputs class scores",
    "features": "penultimate features of a model trained on the suspect data (the input of its last nn.Linear, "
                "its features() and head, or the module named in scan.features_layer)",
    "reference": "a trusted reference copy of the data",
    "behaviour": "the suspicious behaviour (for images, a test input and the class it is pushed towards)",
    "gradients": "a model whose per-example gradients can be computed",
}
# How each caller gives what a need asks for: `AuditContext.caller` picks the words a skip reason ends with.
GIVE_HINTS = {
    "python": {"model": "pass model=", "reference": "pass reference=", "behaviour": "pass behaviour="},
    "command line": {"model": "give --model, or leave it out and let scan train one",
                     "reference": "give --reference CLEAN", "behaviour": "give --behaviour"},
}
# The needs a model trained on the suspect data meets (scan trains one only when a detector has one).
MODEL_NEEDS = frozenset({"model", "logits", "losses", "features", "gradients"})


@dataclass
class AuditContext:
    """What the defender has, plus a cache of what detectors derive from it.

    `data` is the suspect dataset (an ImageDataset, or any dataset whose ``batch(idx)`` feeds
    `model` and `loss_fn`); `reference` a trusted copy in the same order; `model` any network
    trained on `data` (its penultimate features are the output of the module named
    `features_layer`, else found as FeatureExtractor says); `behaviour` the suspicious prediction
    (a behaviour: a ClassBehaviour, or a text behaviour); `probe` held-out inputs for influence probes (a dataset with ``x``);
    `expected_fraction` the poison fraction ε that removal budgets assume; `influence` how influence is
    computed (an InfluenceConfig, or a mapping of its fields).
    """

    data: Any
    model: nn.Module | None = None
    reference: Any = None
    behaviour: Any = None
    probe: Any = None
    expected_fraction: float = 0.01
    loss_fn: Callable | None = None
    batch_size: int = 256
    device: str | None = None  # default: the model's own (a context never moves a caller's model)
    progress: bool = True
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    gradient_cache_bytes: int = 1 << 30
    features_layer: str | None = None
    factors_dir: str | Path | None = None  # where EK-FAC's factors are cached (default: fitted, not kept)
    caller: str | None = None  # "python" or "command line": how skip reasons say to give what is missing
    timings: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)
    extractor: FeatureExtractor | None = field(default=None, init=False, repr=False)  # set from model, features_layer
    _output_problems: dict | None = field(default=None, init=False, repr=False)  # need -> why the model lacks it

    def __post_init__(self) -> None:
        if not 0 < self.expected_fraction < 0.5:
            raise DataError(f"expected poison fraction must lie in (0, 0.5), got {self.expected_fraction}")
        if self.reference is not None and hasattr(self.reference, "x") and hasattr(self.data, "x"):
            if self.reference.x.shape != self.data.x.shape:
                raise DataError(f"reference shape {self.reference.x.shape} differs from the suspect data's "
                                f"{self.data.x.shape}; a reference must hold the same documents in the same order")
        if not isinstance(self.influence, InfluenceConfig):
            self.influence = from_dict(InfluenceConfig, self.influence, "influence")
        if self.device is None:
            self.device = str(model_device(self.model)) if self.model is not None else "cpu"
        if self.model is not None:
            self.model.to(self.device).eval()
            self.extractor = FeatureExtractor(self.model, self.features_layer)

    # ------------------------------------------------------------------ what the defender has
    def __len__(self) -> int:
        return len(self.data)

    @property
    def labels(self) -> np.ndarray:
        """Document labels; a dataset without classes (language modelling) is one class."""
        y = getattr(self.data, "y", None)
        return np.zeros(len(self.data), dtype=np.int64) if y is None else np.asarray(y)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.data, "num_classes", int(self.labels.max()) + 1))

    def has(self, need: str) -> bool:
        return self.lacks(need) is None

    def hint(self, need: str) -> str:
        """What would meet `need`, and how this context's caller gives it (a keyword, a flag)."""
        give = GIVE_HINTS.get(self.caller or "", {}).get(need)
        return ENABLE_HINTS.get(need, need) + (f" ({give})" if give else "")

    def lacks(self, need: str) -> str | None:
        """None when the context can give `need`, else what would enable it (and why this model does not).

        Logits, losses and features are handed in or taken from the model: asking runs the one
        forward pass over the data that computes and caches both logits and features."""
        met = {"data": True, "model": self.model is not None or "features" in self._cache,
               "gradients": self.model is not None,  # influence needs the model itself, for the inverse Hessian too
               "reference": self.reference is not None, "behaviour": self.behaviour is not None}
        if need in met:
            return None if met[need] else self.hint(need)
        if need not in ("logits", "losses", "features"):
            raise PluginError(f"unknown detector need {need!r}; known: data, {', '.join(sorted(ENABLE_HINTS))}")
        if need in self._cache or (need == "losses" and "logits" in self._cache):
            return None
        if self.model is None:
            return self.hint("model")
        cause = self._forward_cached().get("logits" if need == "losses" else need)
        return None if cause is None else f"{need} from this model: {cause}"

    def provide(self, **arrays: Any) -> "AuditContext":
        """Hand in precomputed `features`, `logits`, `losses` or `gradients` (one row per document)."""
        for name, value in arrays.items():
            if len(value) != len(self.data):
                raise DataError(f"provided {name} has {len(value)} rows for {len(self.data)} documents")
            self._cache[name] = value
        return self

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Compute `key` once for every detector that asks for it."""
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = compute()
            self.timings[key] = time.perf_counter() - t0
            log.debug("context: computed %s in %.2fs", key, self.timings[key])
        return self._cache[key]

    # ------------------------------------------------------------------ model outputs
    def _require_model(self, what: str) -> nn.Module:
        if self.model is None:
            raise PluginError(f"{what} needs {self.hint('model')}")
        return self.model

    @torch.no_grad()
    def _forward_all(self) -> tuple[np.ndarray | None, np.ndarray]:
        """Logits (N, C) and flattened penultimate features (None where the extractor found none) of every document."""
        extractor = self.extractor
        n = len(self.data)
        feats, logits = [], []
        bar = tqdm(total=n, desc="features", unit="doc", disable=not self.progress, leave=False)
        try:
            for chunk in iter_chunks(n, self.batch_size):
                x, _ = self.data.batch(np.arange(chunk.start, chunk.stop), self.device)
                h, out = extractor(x)
                if out.ndim != 2 or len(out) != len(x):  # a language model's per-token logits, a segmentation map
                    raise PluginError(f"its output has shape {tuple(out.shape)}, not one row of class scores per "
                                      "document")
                logits.append(out.float().cpu().numpy())
                if h is not None:
                    feats.append(h.reshape(len(h), -1).float().cpu().numpy())
                bar.update(chunk.stop - chunk.start)
        finally:
            bar.close()
        return (np.concatenate(feats) if extractor.problem is None else None), np.concatenate(logits)

    def _forward_cached(self) -> dict:
        """Run the forward pass once (caching logits and features); why either could not be had, by need."""
        if self._output_problems is None:
            t0 = time.perf_counter()
            try:
                feats, logits = self._forward_all()
            except Exception as exc:  # a model that cannot score these inputs: the detectors that need it are skipped
                log.debug("forward pass failed", exc_info=True)
                cause = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {first_line(exc)}"
                self._output_problems = {"logits": cause, "features": self.extractor.problem or cause}
                return self._output_problems
            self.timings["forward"] = time.perf_counter() - t0
            self._cache.setdefault("logits", logits)
            self._output_problems = {}
            if feats is None:
                self._output_problems["features"] = self.extractor.problem
            else:
                self._cache.setdefault("features", feats)
                log.debug("context: penultimate features (%d values per document) are %s",
                          feats.shape[1], self.extractor.source)
        return self._output_problems

    def _take(self, need: str) -> np.ndarray:
        lacking = self.lacks(need)
        if lacking is not None:
            raise PluginError(f"{need}: needs {lacking}")
        return self._cache[need]

    def features(self) -> np.ndarray:
        """Penultimate-layer representations (N, D), flattened per document."""
        return self._take("features")

    def logits(self) -> np.ndarray:
        return self._take("logits")

    def losses(self) -> np.ndarray:
        """Each document's cross-entropy loss under the model trained on it."""
        def compute() -> np.ndarray:
            logits = torch.from_numpy(self.logits()).double()
            return -torch.log_softmax(logits, 1)[torch.arange(len(logits)), torch.from_numpy(self.labels)].numpy()

        return self.cached("losses", compute)

    # ------------------------------------------------------------------ gradients and influence
    def gradient_chunks(self, chunk_size: int = 512) -> Iterator[tuple[slice, torch.Tensor]]:
        """Per-example loss gradients (rows of length P) chunk by chunk.

        When all N x P gradients fit in `gradient_cache_bytes` they are computed once and kept for
        every later detector; otherwise they are recomputed per pass in chunks that fit in it."""
        if self._keeps_gradients() and "gradients" not in self._cache:
            self.cached("gradients", lambda: torch.cat([g for _, g in self._compute_gradients(chunk_size)]))
        if "gradients" in self._cache:
            grads = self._cache["gradients"]
            for chunk in iter_chunks(len(grads), chunk_size):
                yield chunk, torch.as_tensor(grads[chunk])
            return
        yield from self._compute_gradients(max(1, min(chunk_size, self.gradient_cache_bytes // self.gradient_bytes())))

    def gradient_bytes(self) -> int:
        """Bytes of one document's loss gradient (float32, every trainable parameter of the model)."""
        model = self._require_model("per-example gradients")
        return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)

    def _compute_gradients(self, chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
        from infusion_audit.influence import per_example_gradients

        model = self._require_model("per-example gradients")
        n = len(self.data)
        bar = tqdm(total=n, desc="gradients", unit="doc", disable=not self.progress, leave=False)
        for chunk in iter_chunks(n, chunk_size):
            g = per_example_gradients(model, self.data, indices=np.arange(chunk.start, chunk.stop),
                                      batch_size=self.batch_size, **self.loss_kwargs())
            bar.update(chunk.stop - chunk.start)
            yield chunk, g
        bar.close()

    def loss_kwargs(self) -> dict:
        return {} if self.loss_fn is None else {"loss_fn": self.loss_fn}

    def ihvp(self) -> Any:
        """The inverse-Hessian solver (G + λI)^-1 of the model on the suspect data, fitted once.

        With backend "projected" it solves in the projected space: pass it `influence_rows` of
        gradients, never full ones."""
        if self.projected_influence:
            return self._projected()[1]

        def compute() -> Any:
            from infusion_audit.influence import fit_ihvp

            return fit_ihvp(self.influence, self._require_model("influence"), self.data, cache_dir=self.factors_dir,
                            **self.loss_kwargs())

        return self.cached("ihvp", compute)

    # -------------------------------------------------- the space influence is taken in (full or projected)
    @property
    def projected_influence(self) -> bool:
        return self.influence.backend == "projected"

    def _projected(self) -> tuple:
        """Projector, IHVP and the documents' projected gradients, from one pass over the data."""
        def compute() -> tuple:
            from infusion_audit.influence import projected_influence

            settings = self.influence
            return projected_influence(self._require_model("influence"), self.data, rank=settings.rank or 16,
                                       damping=settings.damping, seed=settings.seed, batch_size=self.batch_size,
                                       progress=self.progress, **self.loss_kwargs())

        return self.cached("projected", compute)

    def influence_chunks(self, chunk_size: int = 512) -> Iterator[tuple[slice, torch.Tensor]]:
        """Each document's loss gradient in the influence space, chunk by chunk (see `gradient_chunks`)."""
        if not self.projected_influence:
            yield from self.gradient_chunks(chunk_size)
            return
        rows = self._projected()[2]
        for chunk in iter_chunks(len(rows), chunk_size):
            yield chunk, rows[chunk]

    def _keeps_gradients(self) -> bool:
        """Whether all N x P per-document gradients fit in `gradient_cache_bytes` (then they are kept)."""
        return "gradients" in self._cache or (
            self.model is not None and len(self.data) * self.gradient_bytes() <= self.gradient_cache_bytes)

    def influence_products(self, vectors: torch.Tensor, chunk_size: int = 512) -> np.ndarray:
        """Every document's loss gradient dotted with each row of `vectors` (m, influence space): (N, m).

        Without projection and when the gradients are not kept, vectors that live on the Linear/Conv2d
        layers only (EK-FAC's) are applied layer by layer from one batched backward pass per chunk, exact
        and far cheaper than forming per-document gradients."""
        vectors = torch.as_tensor(vectors).float()
        out = np.zeros((len(self), len(vectors)))
        if not self.projected_influence and self.model is not None and not self._keeps_gradients():
            from infusion_audit.influence import LayerGradients

            layers = LayerGradients(self.model)
            if layers.covers(vectors):
                vectors = vectors.to(self.device)  # once, not per chunk
                bar = tqdm(total=len(self), desc="influence", unit="doc", disable=not self.progress, leave=False)
                for chunk in iter_chunks(len(self), self.batch_size):
                    batch = self.data.batch(np.arange(chunk.start, chunk.stop), self.device)
                    out[chunk] = layers.products(batch, vectors, **self.loss_kwargs()).numpy()
                    bar.update(chunk.stop - chunk.start)
                bar.close()
                return out
        for chunk, grads in self.influence_chunks(chunk_size):
            out[chunk] = (grads.float() @ vectors.T).double().numpy()
        return out

    def influence_rows(self, gradients: torch.Tensor) -> torch.Tensor:
        """Full flat gradients (m, P), e.g. a measurement's, in the influence space."""
        return self._projected()[0].project(gradients) if self.projected_influence else gradients

    def influence_gradients(self, dataset) -> torch.Tensor:
        """Loss gradients of another dataset's documents (held-out probes) in the influence space."""
        model = self._require_model("per-example gradients")
        if self.projected_influence:
            return self._projected()[0].gradients(dataset, batch_size=self.batch_size, **self.loss_kwargs())
        from infusion_audit.influence import per_example_gradients

        return per_example_gradients(model, dataset, batch_size=self.batch_size, **self.loss_kwargs())

    def influence_row_bytes(self) -> int:
        """Bytes of one document's gradient in the influence space (float32)."""
        if self.projected_influence:
            return 4 * self._projected()[0].dim
        return self.gradient_bytes()

    def removal_budget(self, n: int, multiplier: float = 1.5) -> int:
        """How many of `n` documents a budget of multiplier x ε removes (at least one)."""
        return max(1, min(n, int(math.ceil(multiplier * self.expected_fraction * n))))


class Detector:
    """Base class of detector plugins: parameters in __init__, `score` ranks, `flag` decides."""

    name: str = "detector"
    needs: frozenset = frozenset({"data"})
    knowledge: str = "data"
    data_kinds: frozenset | None = None  # dataset kinds it can score ("image", "text"); None: any
    by_default = True  # runs when no detectors are named (False: only when named)

    def applies_to(self, data: Any) -> bool:
        return self.data_kinds is None or getattr(data, "kind", "image") in self.data_kinds

    def required(self) -> frozenset:
        """What this configuration needs: the class's `needs`, unless a parameter changes them."""
        return self.needs

    def missing(self, context: AuditContext) -> str | None:
        """None when the context has what this detector needs, else what would enable it."""
        if not self.applies_to(context.data):
            return (f"scores {' or '.join(sorted(self.data_kinds))} data, not "
                    f"{getattr(context.data, 'kind', 'image')} data")
        lacking = dict.fromkeys(hint for need in sorted(self.required()) if (hint := context.lacks(need)) is not None)
        if not lacking:
            return None
        return "needs " + " and ".join(lacking)

    def knowledge_level(self, context: AuditContext) -> str:
        """The defender's knowledge this run used (some detectors use more when more is given)."""
        return self.knowledge

    def score(self, context: AuditContext) -> np.ndarray:
        raise NotImplementedError

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        """Default rule: remove the 1.5·ε·N highest-scoring documents. A detector whose rule is a
        decision it made while scoring (a cluster, a vote) keeps it in ``decision_`` and returns it."""
        return top_k_mask(scores, context.removal_budget(len(scores)))

    def get_params(self) -> dict:
        return {k: v for k, v in vars(self).items()
                if k != "name" and not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """A detector parameter that must be one of `choices` (build_detector turns this into a one-line error)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores (ties broken by position, deterministically)."""
    mask = np.zeros(len(scores), dtype=bool)
    if k > 0:
        mask[np.argsort(-scores, kind="stable")[:k]] = True
    return mask


def per_class_top_mask(scores: np.ndarray, labels: np.ndarray, context: AuditContext,
                       multiplier: float = 1.5) -> np.ndarray:
    """Within each class c, the ceil(multiplier·ε·n_c) highest scores (the spectral-signature rule)."""
    mask = np.zeros(len(scores), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[idx[top_k_mask(scores[idx], context.removal_budget(len(idx), multiplier))]] = True
    return mask


def robust_z(values: np.ndarray, groups: np.ndarray | None = None, min_group: int = 30) -> np.ndarray:
    """(v - median) / (1.4826·MAD) within each group: 'unusual for its class' on one scale.

    Groups smaller than `min_group` are measured against all values (a MAD of a handful is noise)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(values)
    groups = np.zeros(len(values), dtype=np.int64) if groups is None else np.asarray(groups)
    for g in np.unique(groups):
        idx = groups == g
        ref = values[idx] if idx.sum() >= min_group else values
        med = np.median(ref)
        mad = 1.4826 * np.median(np.abs(ref - med))
        scale = mad if mad > 0 else (ref.std() if ref.std() > 0 else 1.0)
        out[idx] = (values[idx] - med) / scale
    return out


# --------------------------------------------------------------------------- running detectors
@dataclass
class DetectorRun:
    """One detector's output on one context, or why it was skipped."""

    name: str
    params: dict
    knowledge: str | None = None
    scores: np.ndarray | None = None
    flagged: np.ndarray | None = None
    seconds: float = 0.0
    skipped: str | None = None
    error: str | None = None  # when it raised: "Type: first line" (and `skipped` says it failed)
    details: dict = field(default_factory=dict)


def build_detector(name: str, params: dict | None = None) -> Detector:
    """Instantiate a registered detector (or ``package.module:Class``) with one-line errors."""
    from infusion_audit.registry import DETECTORS

    cls = DETECTORS.get(name)
    try:
        detector = cls(**(params or {}))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"detector {name!r}: bad params {params or {}}: {exc}") from None
    detector.name = name
    return detector


def run_detector(detector: Detector, context: AuditContext) -> DetectorRun:
    """Score and flag, timing the detector; a detector whose needs are unmet is skipped with the reason."""
    run = DetectorRun(detector.name, detector.get_params())
    t0 = time.perf_counter()  # checking the needs may run the shared forward pass: the first detector pays for it
    reason = detector.missing(context)
    if reason is not None:
        run.skipped = reason
        SKIP_LOG.debug("%s not run: %s", detector.name, reason)  # the caller reports it (CLI summary, bench driver)
        return run
    try:
        scores = np.asarray(detector.score(context), dtype=np.float64)
        if scores.shape != (len(context),):
            raise PluginError(f"returned scores of shape {scores.shape}, expected ({len(context)},)")
        if not np.isfinite(scores).all():
            raise PluginError("returned non-finite scores")
        flagged = np.asarray(detector.flag(scores, context), dtype=bool)
    except Exception as exc:  # one broken detector must not cost the defender the others' results
        run.error = f"{type(exc).__name__}: {first_line(exc)}"
        run.skipped = f"failed: {run.error}"
        SKIP_LOG.warning("detector %s %s", detector.name, run.skipped)
        log.debug("detector %s failed", detector.name, exc_info=True)
        return run
    run.scores, run.flagged = scores, flagged
    run.seconds = time.perf_counter() - t0
    run.knowledge = detector.knowledge_level(context)
    run.details = dict(getattr(detector, "details_", {}))
    return run
