"""Influence at scale: what per-document gradients are needed for, without forming them.

A full per-example gradient of a CIFAR-sized ResNet has hundreds of thousands of entries and costs a
vmap'd backward pass per document. But a Linear/Conv2d layer's per-document gradient is
Σ_positions δ aᵀ (output gradient times input activation), both of which one ordinary batched
backward pass gives for every document at once. From them:

- its inner product with any vector V (a preconditioned query) is Σ_positions δ · (V a): one extra
  convolution of the layer's input per query. Exact, so forensic influence keeps EK-FAC's scores;
- its LoGra projection (Choe et al., 2024) P_out G P_inᵀ, with two small random matrices per layer,
  is Σ_positions (P_out δ)(P_in a)ᵀ. Influence is then taken in the projected space with the Fisher
  estimated there (labels sampled from the model, as the EK-FAC backend does): the "projected"
  backend, for self-influence and probes over tens of thousands of documents.
Parameters of other modules (BatchNorm, embeddings) are left out, as EK-FAC leaves them out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..io import iter_chunks
from ..runtime import model_device
from ..training import classification_loss
from .gradients import LossFn, batch_size_of, capture_output, num_trainable, parameter_slices
from .ihvp import IHVP, sampled_labels

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    """One projected module: where its weight (and bias) sit in the flat gradient, and its two projections."""

    module: nn.Module
    weight: slice
    bias: slice | None
    p_out: torch.Tensor  # (k_out, out_features)
    p_in: torch.Tensor  # (k_in, in_features [+1 for the bias])

    @property
    def dim(self) -> int:
        return len(self.p_out) * len(self.p_in)


def _projection(k: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """A (min(k, d), d) Gaussian sketch with E[PᵀP] = I, or the identity when k >= d (nothing to save)."""
    if k >= d:
        return torch.eye(d)
    return torch.randn(k, d, generator=generator) / math.sqrt(k)


class LayerGradients:
    """Documents' loss gradients in a model's Linear and Conv2d layers, from one batched backward pass.

    `project` maps flat gradient vectors (a measurement's, a query's) to `rank` x `rank` per layer
    and `per_example` computes the same projection of each document's loss gradient; `products`
    gives each document's exact inner products with flat vectors. Layers whose dimensions are at
    most `rank` are kept exactly (P = I).
    """

    def __init__(self, model: nn.Module, rank: int = 16, seed: int = 0):
        if not isinstance(rank, int) or rank < 1:
            raise UserError(f"influence rank must be a positive integer, got {rank!r}")
        self.model = model
        offsets = parameter_slices(model)
        self.num_parameters = num_trainable(model)
        generator = torch.Generator().manual_seed(seed)
        self.layers: list[_Layer] = []
        device = model_device(model)
        for module in model.modules():
            if not self._supported(module) or id(module.weight) not in offsets:
                continue
            bias = module.bias if module.bias is not None and id(module.bias) in offsets else None
            fan_in = module.weight[0].numel() + (bias is not None)
            self.layers.append(_Layer(module, offsets[id(module.weight)], None if bias is None else offsets[id(bias)],
                                      _projection(rank, module.weight.shape[0], generator).to(device),
                                      _projection(rank, fan_in, generator).to(device)))
        if not self.layers:
            raise UserError("influence backend 'projected' found no Linear or Conv2d layer with trainable weights")
        self.dim = sum(layer.dim for layer in self.layers)

    @staticmethod
    def _supported(module: nn.Module) -> bool:
        if isinstance(module, nn.Linear):
            return True
        return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(m, P) flat gradients -> (m, dim): P_out [G_weight | g_bias] P_inᵀ per layer."""
        vectors = torch.as_tensor(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.num_parameters:
            raise ValueError(f"expected (m, {self.num_parameters}) gradients, got {tuple(vectors.shape)}")
        m, out = len(vectors), []
        for layer in self.layers:
            p_out, p_in = layer.p_out.to(vectors), layer.p_in.to(vectors)
            mat = vectors[:, layer.weight].reshape(m, p_out.shape[1], -1)
            if layer.bias is not None:
                mat = torch.cat([mat, vectors[:, layer.bias].reshape(m, -1, 1)], dim=2)
            out.append((p_out @ mat @ p_in.T).reshape(m, -1))
        return torch.cat(out, dim=1)

    def _record(self, batch: Any, loss_fn: LossFn) -> tuple[list, torch.Tensor, torch.Tensor]:
        """One forward pass: every call of a tracked layer as (layer index, input, output), the summed
        loss (each document's term separate) and the model's logits. Eval mode, so documents do not
        interact (BatchNorm uses running statistics)."""
        model = self.model.eval()
        calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def keep(i: int):
            def hook(_module, inputs, output):
                calls.append((i, inputs[0].detach(), output))
            return hook

        handles = [layer.module.register_forward_hook(keep(i)) for i, layer in enumerate(self.layers)]
        try:
            with capture_output(model) as logits:
                loss = loss_fn(model, batch) * batch_size_of(batch)
        finally:
            for handle in handles:
                handle.remove()
        if not calls:
            raise UserError("influence: the loss did not run through the model's Linear/Conv2d layers")
        return calls, loss, logits[0]

    def per_example(self, batch: Any, loss_fn: LossFn = classification_loss,
                    sampled: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected loss gradients of each document of `batch`: (B, dim) on the CPU.

        With `sampled` (a generator), also the projected gradients of the loss against labels sampled
        from the model's prediction (the true Fisher's), from the same forward pass."""
        calls, loss, logits = self._record(batch, loss_fn)
        with torch.no_grad():  # the activations' projections do not depend on which loss is differentiated
            inputs = [self._project_input(self.layers[i], a) for i, a, _ in calls]
        losses = [loss]
        if sampled is not None:
            flat = logits.reshape(-1, logits.shape[-1])
            losses.append(F.cross_entropy(flat, sampled_labels(flat, sampled), reduction="sum"))
        results = []
        for j, value in enumerate(losses):
            grads = torch.autograd.grad(value, [z for _, _, z in calls], retain_graph=j + 1 < len(losses),
                                        allow_unused=True)
            results.append(self._combine(calls, inputs, grads, batch_size_of(batch)))
        return results[0], (results[1] if sampled is not None else None)

    def covers(self, vectors: torch.Tensor) -> bool:
        """Whether `vectors` are zero outside the tracked layers (so `products` are exact for them)."""
        outside = torch.ones(self.num_parameters, dtype=torch.bool)
        for layer in self.layers:
            outside[layer.weight] = False
            if layer.bias is not None:
                outside[layer.bias] = False
        return not bool(torch.as_tensor(vectors)[:, outside].any())

    def products(self, batch: Any, vectors: torch.Tensor, loss_fn: LossFn = classification_loss) -> torch.Tensor:
        """vᵀ∇L(z_i) for each document of `batch` and each row v of `vectors` (m, P), over the tracked
        layers: (B, m), float64 on the CPU. Σ_positions δ · (V a) is the layer applied with weights V."""
        calls, loss, _ = self._record(batch, loss_fn)
        grads = torch.autograd.grad(loss, [z for _, _, z in calls], allow_unused=True)
        n = batch_size_of(batch)
        vectors = torch.as_tensor(vectors).to(calls[0][1])  # a no-op when the caller moved them once
        out = torch.zeros(n, len(vectors), dtype=torch.float64, device=vectors.device)
        with torch.no_grad():
            for (i, a, _), delta in zip(calls, grads):
                if delta is None:
                    continue
                layer = self.layers[i]
                for j, v in enumerate(vectors):
                    weight = v[layer.weight].view_as(layer.module.weight)
                    bias = v[layer.bias] if layer.bias is not None else None
                    if isinstance(layer.module, nn.Conv2d):
                        z = F.conv2d(a, weight, bias, layer.module.stride, layer.module.padding, layer.module.dilation)
                    else:
                        z = F.linear(a, weight, bias)
                    out[:, j] += (z * delta).reshape(n, -1).sum(1).double()
        return out.cpu()

    def _project_input(self, layer: _Layer, a: torch.Tensor) -> torch.Tensor:
        """The layer's input activations projected by P_in, one row per output position: (B, L, k_in)."""
        module, p_in = layer.module, layer.p_in.to(a.dtype)
        fan_in = module.weight[0].numel()
        weight, bias = p_in[:, :fan_in], (p_in[:, fan_in] if layer.bias is not None else None)
        if isinstance(module, nn.Conv2d):  # P_in applied to every unfolded patch is itself a convolution
            out = F.conv2d(a, weight.reshape(len(p_in), *module.weight.shape[1:]), bias, module.stride,
                           module.padding, module.dilation)
            return out.flatten(2).transpose(1, 2)
        return F.linear(a, weight, bias).reshape(len(a), -1, len(p_in))

    def _combine(self, calls, inputs, grads, n: int) -> torch.Tensor:
        """Σ over calls and positions of (P_out δ)(P_in a)ᵀ per layer, flattened like `project`."""
        out = [None] * len(self.layers)
        with torch.no_grad():
            for (i, _, _), a, delta in zip(calls, inputs, grads):
                layer = self.layers[i]
                if delta is None:
                    continue
                delta = delta.to(a.dtype)
                if isinstance(layer.module, nn.Conv2d):
                    d = torch.einsum("bcl,kc->blk", delta.flatten(2), layer.p_out.to(a.dtype))
                else:
                    d = (delta @ layer.p_out.to(a.dtype).T).reshape(len(delta), -1, len(layer.p_out))
                term = torch.einsum("blo,bli->boi", d, a).reshape(n, -1).float().cpu()
                out[i] = term if out[i] is None else out[i] + term
        return torch.cat([torch.zeros(n, layer.dim) if o is None else o for o, layer in zip(out, self.layers)], dim=1)

    def gradients(self, dataset, loss_fn: LossFn = classification_loss, batch_size: int = 256,
                  progress: bool = False) -> torch.Tensor:
        """Projected loss gradients of `dataset`'s documents: (N, dim)."""
        rows, _ = self.gradients_and_fisher(dataset, loss_fn, batch_size, progress=progress, fisher=False)
        return rows

    def gradients_and_fisher(self, dataset, loss_fn: LossFn = classification_loss, batch_size: int = 256,
                             seed: int = 0, progress: bool = False,
                             fisher: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected loss gradients (N, dim) and, in the same pass, the projected true Fisher (dim, dim):
        the mean outer product of gradients against labels sampled from the model (seeded)."""
        n, device = len(dataset), model_device(self.model)
        generator = torch.Generator().manual_seed(seed) if fisher else None
        rows = torch.empty(n, self.dim)
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64) if fisher else None
        bar = tqdm(total=n, desc="projected gradients", unit="doc", disable=not progress, leave=False)
        try:
            for chunk in iter_chunks(n, batch_size):
                batch = dataset.batch(np.arange(chunk.start, chunk.stop), device)
                true, sampled = self.per_example(batch, loss_fn, generator)
                rows[chunk] = true
                if fisher:
                    total += sampled.double().T @ sampled.double()
                bar.update(chunk.stop - chunk.start)
        finally:
            bar.close()
        return rows, (total / max(1, n) if fisher else None)


class ProjectedIHVP(IHVP):
    """(F + λI)^-1 in the projected space, F the projected true Fisher; `damping` "auto" is kronfluence's
    heuristic, 0.1 × the mean eigenvalue of F. Vectors it solves for must be projected first."""

    backend = "projected"

    def __init__(self, model: nn.Module, fisher: torch.Tensor, damping: float | str = "auto"):
        eigenvalues, self.eigenvectors = torch.linalg.eigh(fisher.double())
        self.eigenvalues = eigenvalues.clamp_min(0)
        if damping == "auto":
            damping = 0.1 * float(self.eigenvalues.mean())
        elif not isinstance(damping, (int, float)):
            raise UserError(f"influence damping must be a number or 'auto', got {damping!r}")
        super().__init__(model, damping)
        self.info = {"dim": len(fisher), "mean_eigenvalue": float(self.eigenvalues.mean())}

    def solve_many(self, V: torch.Tensor) -> torch.Tensor:
        q = self.eigenvectors
        rotated = q.T @ V.detach().cpu().double().T
        return (q @ (rotated / (self.eigenvalues + self.damping)[:, None])).T.to(V.dtype)


def projected_influence(model: nn.Module, dataset, rank: int = 16, damping: float | str = "auto", seed: int = 0,
                        loss_fn: LossFn = classification_loss, batch_size: int = 256,
                        progress: bool = False) -> tuple[LayerGradients, ProjectedIHVP, torch.Tensor]:
    """The projector, the IHVP fitted on `dataset` and the documents' projected gradients, in one pass."""
    projector = LayerGradients(model, rank=rank, seed=seed)
    rows, fisher = projector.gradients_and_fisher(dataset, loss_fn=loss_fn, batch_size=batch_size, seed=seed,
                                                  progress=progress)
    ihvp = ProjectedIHVP(model, fisher, damping)
    log.debug("projected influence: %d dimensions over %d layers, damping %.3g", projector.dim,
              len(projector.layers), ihvp.damping)
    return projector, ihvp, rows
