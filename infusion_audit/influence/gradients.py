"""Gradients the influence engine is built from: per-document parameter gradients, the flat
parameter layout, and the input-gradient of influence that Infusion ascends.

Everything works on a model plus a ``loss_fn(model, batch)`` returning the MEAN loss of a batch and
a dataset with ``.batch(index)``, so the same code serves image classifiers and language models.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import UserError
from ..training import classification_loss

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters influence is taken over, in the order of the flattened vectors."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_slices(model: nn.Module) -> dict[int, slice]:
    """Where each trainable parameter (by id) sits in the flattened vectors."""
    out, offset = {}, 0
    for p in trainable_parameters(model).values():
        out[id(p)] = slice(offset, offset + p.numel())
        offset += p.numel()
    return out


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def flatten(tensors: Iterator[torch.Tensor] | list[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate tensors into one vector (or one row per leading batch index)."""
    tensors = list(tensors)
    if batch_dims:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(model: nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat (P,) vector into tensors shaped like the model's trainable parameters."""
    out, offset = {}, 0
    for name, p in trainable_parameters(model).items():
        out[name] = vector[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the model has {offset} trainable parameters")
    return out


def _batch_map(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """Apply `fn` to every tensor of a batch (tuple, list, dict or tensor)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _batch_map(fn, v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_batch_map(fn, v) for v in batch)
    return batch


class _LossOf(nn.Module):
    """loss_fn bound to a model as a module, so torch.func can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def differentiable_attention(model: nn.Module):
    """Run a transformers model with eager attention inside the block, then restore the one it had.

    Training and inference keep the implementation the model was loaded with (SDPA by default). But the
    SDPA path does not survive what influence needs: its mask code branches on tensor values (vmap refuses)
    and its fused CPU kernel has neither a double backward nor forward-mode AD. Eager attention computes the
    same function with plain tensor operations, which every torch.func transform handles. Other models pass
    through unchanged."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield model
        return
    model.set_attn_implementation("eager")
    if config._attn_implementation != "eager":  # a model that cannot switch (transformers logged why)
        raise UserError(f"{type(model).__name__} computes attention with {current!r} and cannot switch to eager "
                        "attention, which per-document gradients need; save the model with "
                        '"attn_implementation": "eager" in its config.json')
    try:
        yield model
    finally:
        model.set_attn_implementation(current)


def per_example_gradients(model: nn.Module, dataset, indices: np.ndarray | None = None,
                          loss_fn: LossFn = classification_loss, batch_size: int = 256) -> torch.Tensor:
    """Gradient of each document's loss, flattened over the trainable parameters: (N, P) on the CPU.

    vmap over a one-document batch, so any mean-reduced `loss_fn` gives true per-document gradients.
    The model is used in eval mode (no dropout; BatchNorm uses its running statistics).
    """
    model.eval()
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    wrapped = _LossOf(model, loss_fn)
    params = {f"model.{k}": v.detach() for k, v in trainable_parameters(model).items()}
    buffers = {f"model.{k}": v for k, v in model.named_buffers()}

    def one(p: dict, doc: Any) -> torch.Tensor:
        return functional_call(wrapped, (p, buffers), (_batch_map(lambda t: t.unsqueeze(0), doc),))

    per_doc = vmap(grad(one), in_dims=(None, 0))
    rows = []
    with differentiable_attention(model):
        for start in range(0, len(indices), batch_size):
            batch = dataset.batch(indices[start:start + batch_size], _device(model))
            grads = per_doc(params, batch)
            rows.append(flatten(grads.values(), batch_dims=1).detach().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, num_trainable(model))


def batch_size_of(batch: Any) -> int:
    """Number of documents in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return batch_size_of(next(iter(items)))


def loss_gradient(model: nn.Module, batch: Any, loss_fn: LossFn = classification_loss) -> torch.Tensor:
    """Flat gradient of the (mean) loss of one batch: (P,)."""
    params = list(trainable_parameters(model).values())
    loss = loss_fn(model, batch)
    return flatten(torch.autograd.grad(loss, params)).detach()


@contextlib.contextmanager
def capture_output(model: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Record the model's output logits during `loss_fn(model, batch)`, optionally replacing them.

    Splitting the loss at the logits is how the Gauss-Newton product and the Fisher's sampled labels
    are computed for any loss_fn: the model's forward returns a tensor or an object with `.logits`.
    """
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        logits = output if isinstance(output, torch.Tensor) else output.logits
        seen.append(logits)
        if replace is None:
            return None
        new = replace(logits)
        if isinstance(output, torch.Tensor):
            return new
        output.logits = new
        return output

    handle = model.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, n_train: int,
                   loss_fn: LossFn = classification_loss) -> torch.Tensor:
    """G_delta = -(1/n) d/dx <grad_theta L(x, y), v> for a batch of documents, by double back-propagation.

    Moving document x along G_delta raises the measurement f after retraining (to first order).
    Summing the documents' losses keeps each document's term separate: x_j only enters L(x_j, y_j).
    The model is in eval mode so documents in one batch do not interact (BatchNorm statistics).
    """
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    params = list(trainable_parameters(model).values())
    with differentiable_attention(model):
        loss = loss_fn(model, (x, y)) * len(x)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, unflatten(model, v.to(x.device)).values()))
        (gx,) = torch.autograd.grad(dot, x)
    return -gx / n_train
