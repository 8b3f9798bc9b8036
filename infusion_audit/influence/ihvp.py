"""Inverse-Hessian-vector products v = (G + damping I)^-1 g, G the Gauss-Newton (= true Fisher) matrix
of the mean training loss, with two backends:

- ``exact``: conjugate gradient on G + damping I, G applied matrix-free over the whole training set.
  The ground truth for small models; it records its iterations and relative residual.
- ``ekfac``: kronfluence fits EK-FAC factors (true Fisher, labels sampled from the model); kronfluence
  does not return the preconditioned vector, so we apply its eigenbases and corrected eigenvalues
  ourselves. Parameters of modules kronfluence does not track (BatchNorm, embeddings) get 0.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..io import array_hash, record_hash, stable_hash, verified, waiting_lock
from ..training import classification_loss
from .gradients import (LossFn, batch_size_of, capture_output, differentiable_attention, flatten, parameter_slices,
                        trainable_parameters, unflatten)

log = logging.getLogger(__name__)


class IHVP:
    """Solves (G + damping I) x = v for flat parameter vectors v."""

    backend = ""

    def __init__(self, model: nn.Module, damping: float):
        if not damping > 0:
            raise UserError(f"influence damping must be > 0, got {damping}")
        self.model = model
        self.damping = float(damping)
        self.info: dict = {}

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return self.solve_many(v[None])[0]

    def solve_many(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- exact (CG)
class ExactIHVP(IHVP):
    """Conjugate gradient on the damped Gauss-Newton matrix, applied batch by batch over the training set."""

    backend = "exact"

    def __init__(self, model: nn.Module, dataset, damping: float, loss_fn: LossFn = classification_loss,
                 tol: float = 1e-5, max_iter: int = 1000, batch_size: int = 512):
        super().__init__(model, damping)
        self.dataset, self.loss_fn = dataset, loss_fn
        self.tol, self.max_iter, self.batch_size = tol, max_iter, batch_size
        self.info = {"iterations": [], "residual": [], "seconds": []}

    def gnvp(self, v: torch.Tensor) -> torch.Tensor:
        """G v = (1/n) sum_i J_i^T H_i J_i v, H_i the loss Hessian in the model's logits."""
        model = self.model.eval()
        params = list(trainable_parameters(model).values())
        device = params[0].device
        vs = list(unflatten(model, v.to(device=device, dtype=params[0].dtype)).values())
        n = len(self.dataset)
        out = torch.zeros(v.numel(), dtype=torch.float64, device=device)  # summed where computed, copied once
        for start in range(0, n, self.batch_size):
            batch = self.dataset.batch(np.arange(start, min(n, start + self.batch_size)), device)
            leaves: list[torch.Tensor] = []

            def as_leaf(z: torch.Tensor) -> torch.Tensor:
                leaves.append(z.detach().requires_grad_(True))
                return leaves[-1]

            with capture_output(model, as_leaf) as seen, differentiable_attention(model):
                loss = self.loss_fn(model, batch)
                z, leaf = seen[0], leaves[0]
                (gz,) = torch.autograd.grad(loss, leaf, create_graph=True)
                u = torch.zeros_like(z, requires_grad=True)  # J v by differentiating the linear map u -> J^T u
                jtu = torch.autograd.grad(z, params, u, create_graph=True)
                (jv,) = torch.autograd.grad(jtu, u, vs)
                (hjv,) = torch.autograd.grad(gz, leaf, jv)
                gv = torch.autograd.grad(z, params, hjv)
            out += flatten(gv).detach().double() * (batch_size_of(batch) / n)
        return out.cpu()

    def solve_many(self, V: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._cg(v) for v in V]).to(V.dtype)

    def _cg(self, b: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        b = b.detach().cpu().double()
        apply = lambda x: self.gnvp(x) + self.damping * x  # noqa: E731
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = r @ r
        bnorm = math.sqrt(float(b @ b)) or 1.0
        it = 0
        while it < self.max_iter and math.sqrt(float(rs)) > self.tol * bnorm:
            ap = apply(p)
            alpha = rs / (p @ ap)
            x += alpha * p
            r -= alpha * ap
            rs_new = r @ r
            p = r + (rs_new / rs) * p
            rs = rs_new
            it += 1
        residual = float(torch.linalg.vector_norm(apply(x) - b)) / bnorm
        self.info["iterations"].append(it)
        self.info["residual"].append(residual)
        self.info["seconds"].append(time.perf_counter() - t0)
        if residual > 10 * self.tol:
            log.warning("exact IHVP: CG stopped after %d iterations at relative residual %.2e", it, residual)
        return x


# --------------------------------------------------------------------------- EK-FAC (kronfluence)
def sampled_fisher_loss(model: nn.Module, batch: Any, loss_fn: LossFn = classification_loss,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Summed cross-entropy against labels sampled from the model's own prediction (the true Fisher).

    Works for any loss_fn whose model returns logits over classes in the last dimension."""
    with capture_output(model) as seen:
        loss_fn(model, batch)
    flat = seen[0].reshape(-1, seen[0].shape[-1])
    return F.cross_entropy(flat, sampled_labels(flat, generator), reduction="sum")


def sampled_labels(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row of (n, classes) logits, drawn from the model's prediction with a CPU generator, so
    that the same seed gives the same labels on any device."""
    probs = torch.softmax(logits.detach().float(), -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


class _IndexDataset(torch.utils.data.Dataset):
    """Hands kronfluence document indices; the collate function turns them into our batches."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _kronfluence_task(loss_fn: LossFn, sampled_loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
    from kronfluence.task import Task

    class FisherTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            if sample:
                return sampled_loss_fn(model, batch)
            return loss_fn(model, batch) * batch_size_of(batch)

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return loss_fn(model, batch) * batch_size_of(batch)

    return FisherTask()


@dataclass
class _Block:
    """One tracked module: where its weight (and bias) live in the flat vector, and its factors."""

    name: str
    weight: slice
    out_features: int
    bias: slice | None
    activation_eigenvectors: torch.Tensor
    gradient_eigenvectors: torch.Tensor
    lambdas: torch.Tensor  # (out, in[+1]) corrected eigenvalues, mean over documents


class EkfacIHVP(IHVP):
    """EK-FAC factors fitted by kronfluence (true Fisher, all Linear/Conv2d), applied per module."""

    backend = "ekfac"

    def __init__(self, model: nn.Module, dataset, damping: float, loss_fn: LossFn = classification_loss,
                 cache_dir: str | Path | None = None, batch_size: int = 128, seed: int = 0,
                 sampled_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None):
        super().__init__(model, damping)
        self.loss_fn = loss_fn
        generator = torch.Generator().manual_seed(seed)  # the Fisher's labels, drawn on the CPU on any device
        self.sampled_loss_fn = sampled_loss_fn or (lambda m, b: sampled_fisher_loss(m, b, loss_fn, generator))
        t0 = time.perf_counter()
        factors, cached = self._fit(dataset, cache_dir, batch_size, seed)
        self.blocks = self._blocks(factors)
        self.info = {"fit_seconds": time.perf_counter() - t0, "cached": cached,
                     "modules": [b.name for b in self.blocks]}
        untracked = sorted({type(m).__name__ for m in model.modules()
                            if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))
                            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2})
        if untracked:  # e.g. GPT-2's attention and MLP are transformers' Conv1D
            log.warning("EK-FAC leaves out the %s layers of %s (kronfluence fits nn.Linear and nn.Conv2d): their "
                        "parameters get no influence; influence.backend exact covers every parameter",
                        ", ".join(untracked), type(model).__name__)

    def factor_key(self, dataset, seed: int) -> str:
        state = [t.detach().cpu().numpy() for t in self.model.state_dict().values()]
        data = dataset.content_hash() if hasattr(dataset, "content_hash") else len(dataset)
        return stable_hash({"model": array_hash(*state), "data": data, "seed": seed,
                            "loss": getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))})

    def _fit(self, dataset, cache_dir: str | Path | None, batch_size: int, seed: int) -> tuple[dict, bool]:
        import copy

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.utils.dataset import DataLoaderKwargs

        key = self.factor_key(dataset, seed)
        tmp = None
        if cache_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="ekfac-")
            cache_dir = tmp.name
        task = _kronfluence_task(self.loss_fn, self.sampled_loss_fn)
        self.task, self.analysis_name = task, f"ekfac-{key}"
        device = next(self.model.parameters()).device
        prepared = prepare_model(copy.deepcopy(self.model).eval(), task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # kronfluence's deprecated GradScaler call
            analyzer = Analyzer(self.analysis_name, prepared, task, cpu=device.type == "cpu", disable_tqdm=True,
                                output_dir=str(cache_dir), log_level=logging.WARNING)
            factors_dir = Path(cache_dir) / self.analysis_name / "factors_factors"
            with waiting_lock(Path(cache_dir) / f"{self.analysis_name}.lock"):
                cached = verified(factors_dir)  # a damaged or unrecorded cache is refitted, with a warning
                if not cached:
                    collate = lambda idx: dataset.batch(np.asarray(idx), device)  # noqa: E731
                    analyzer.fit_all_factors("factors", _IndexDataset(len(dataset)),
                                             per_device_batch_size=batch_size,
                                             dataloader_kwargs=DataLoaderKwargs(collate_fn=collate),
                                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
                    if tmp is None:
                        record_hash(factors_dir)
                factors = analyzer.load_all_factors("factors")
        if tmp is not None:
            tmp.cleanup()
        return factors, cached

    def _blocks(self, factors: dict) -> list[_Block]:
        offsets = parameter_slices(self.model)
        modules = dict(self.model.named_modules())
        blocks = []
        for name, lam in factors["lambda_matrix"].items():
            module = modules[name]
            if id(module.weight) not in offsets:
                continue
            bias = getattr(module, "bias", None)
            bias_slice = offsets.get(id(bias)) if bias is not None else None
            lam = lam.double() / factors["num_lambda_processed"][name].double()
            expected_in = module.weight[0].numel() + (1 if bias is not None else 0)
            if lam.shape != (module.weight.shape[0], expected_in):
                raise RuntimeError(f"ekfac: module {name}: lambda shape {tuple(lam.shape)} does not match "
                                   f"({module.weight.shape[0]}, {expected_in})")
            blocks.append(_Block(name, offsets[id(module.weight)], module.weight.shape[0], bias_slice,
                                 factors["activation_eigenvectors"][name].double(),
                                 factors["gradient_eigenvectors"][name].double(), lam))
        return blocks

    def solve_many(self, V: torch.Tensor) -> torch.Tensor:
        """Rotate each module's gradient into the Kronecker eigenbasis, divide by lambda + damping, rotate back."""
        V = V.detach().cpu()
        out = torch.zeros_like(V, dtype=torch.float64)
        m = len(V)
        for b in self.blocks:
            mat = V[:, b.weight].double().reshape(m, b.out_features, -1)
            if b.bias is not None:  # kronfluence appends the bias as the last input column
                mat = torch.cat([mat, V[:, b.bias].double().reshape(m, b.out_features, 1)], dim=2)
            rot = b.gradient_eigenvectors.T @ mat @ b.activation_eigenvectors
            rot = rot / (b.lambdas + self.damping)
            back = b.gradient_eigenvectors @ rot @ b.activation_eigenvectors.T
            if b.bias is not None:
                out[:, b.bias] = back[:, :, -1]
                back = back[:, :, :-1]
            out[:, b.weight] = back.reshape(m, -1)
        return out.to(V.dtype)


BACKENDS = {"exact": ExactIHVP, "ekfac": EkfacIHVP}


def make_ihvp(backend: str, model: nn.Module, dataset, damping: float, loss_fn: LossFn = classification_loss,
              **kw) -> IHVP:
    """An IHVP solver for `model` trained on `dataset` (see the module docstring for the backends)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown influence backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](model, dataset, damping, loss_fn=loss_fn, **kw)


def fit_ihvp(settings, model: nn.Module, dataset, loss_fn: LossFn = classification_loss,
             cache_dir: str | Path | None = None, **kw) -> IHVP:
    """The full-space IHVP an `InfluenceConfig` describes (backend ekfac or exact), fitted on `dataset`, or on a
    seeded sample of `settings.fit_size` documents of it (the curvature of a large set from a sample). EK-FAC
    factors are cached under `cache_dir`; `kw` go to the backend (e.g. the exact solver's `max_iter`)."""
    if settings.backend not in BACKENDS:
        raise UserError(f"influence backend {settings.backend!r} serves detectors only; attacks and full-space "
                        f"influence need one of {', '.join(BACKENDS)}")
    if settings.fit_size is not None and settings.fit_size < len(dataset):
        dataset = dataset.subset(np.sort(np.random.default_rng(0).choice(len(dataset), settings.fit_size,
                                                                          replace=False)))
    if settings.backend == "ekfac":
        kw = {"seed": settings.seed, **({"cache_dir": cache_dir} if cache_dir is not None else {}), **kw}
    return make_ihvp(settings.backend, model, dataset, settings.damping, loss_fn=loss_fn, **kw)
