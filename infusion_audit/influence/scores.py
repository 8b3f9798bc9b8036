"""Influence scores of training documents on a measurement."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp

from ..training import classification_loss
from .gradients import (LossFn, _device, _LossOf, differentiable_attention, per_example_gradients, trainable_parameters,
                        unflatten)


def influence_scores(model: nn.Module, dataset, v: torch.Tensor, indices: np.ndarray | None = None,
                     loss_fn: LossFn = classification_loss, batch_size: int = 256, cosine: bool = False) -> np.ndarray:
    """s_i = v^T grad L(z_i) with v = (G + damping I)^-1 grad f (kronfluence's convention).

    Up-weighting document i by eps changes f by about -eps * s_i / n, so the most NEGATIVE scores
    mark the documents whose up-weighting most raises f. Computed in chunks: no (N, P) matrix is kept.

    `cosine`: s_i / |grad L(z_i)|, influence per unit of gradient. Raw influence grows with the gradient's
    norm, so an edit that makes a document absurd (a loss and a gradient many times the corpus') scores
    high whatever its direction, while an adaptive optimiser such as Adam scales a step by the typical
    gradient, not this document's: the direction is what survives retraining (the argument of RelatIF,
    Barshan et al. 2020, and of gradient matching).
    """
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    v = v.detach().cpu().double()
    out = []
    for s in range(0, len(indices), batch_size):
        grads = per_example_gradients(model, dataset, indices[s:s + batch_size], loss_fn, batch_size).double()
        out.append(grads @ v / grads.norm(dim=1).clamp_min(1e-30) if cosine else grads @ v)
    return torch.cat(out).numpy() if out else np.zeros(0)


def directional_scores(model: nn.Module, dataset, v: torch.Tensor, document_loss_fn: LossFn,
                       indices: np.ndarray | None = None, batch_size: int = 1024) -> np.ndarray:
    """The same s_i as `influence_scores`, as each document's loss differentiated along v (forward mode).

    One Jacobian-vector product per batch replaces a gradient per document, so a token attack can afford
    to score many candidate edits exactly.
    `document_loss_fn(model, batch)` returns one loss per document; documents in a batch must not
    interact (the model is put in eval mode).
    """
    model.eval()
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    wrapped = _LossOf(model, document_loss_fn)
    params = {f"model.{k}": p.detach() for k, p in trainable_parameters(model).items()}
    like = next(iter(params.values()))
    tangents = {f"model.{k}": t for k, t in unflatten(model, v.detach().to(like.device, like.dtype)).items()}
    buffers = {f"model.{k}": b for k, b in model.named_buffers()}
    out = []
    with torch.no_grad(), differentiable_attention(model), warnings.catch_warnings():
        # torch loads its forward-AD decompositions on first use through the deprecated torch.jit.script
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        for start in range(0, len(indices), batch_size):
            batch = dataset.batch(indices[start:start + batch_size], _device(model))
            _, derivative = jvp(lambda p: functional_call(wrapped, (p, buffers), (batch,)), (params,), (tangents,))
            out.append(derivative.double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)
