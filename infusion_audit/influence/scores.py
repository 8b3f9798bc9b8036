"""Influence scores of training documents on a measurement."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..training import classification_loss
from .gradients import LossFn, per_example_gradients


def influence_scores(model: nn.Module, dataset, v: torch.Tensor, indices: np.ndarray | None = None,
                     loss_fn: LossFn = classification_loss, batch_size: int = 256) -> np.ndarray:
    """s_i = v^T grad L(z_i) with v = (G + damping I)^-1 grad f (kronfluence's convention).

    Up-weighting document i by eps changes f by about -eps * s_i / n, so the most NEGATIVE scores
    mark the documents whose up-weighting most raises f. Computed in chunks: no (N, P) matrix is kept.
    """
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    v = v.detach().cpu().double()
    out = [per_example_gradients(model, dataset, indices[s:s + batch_size], loss_fn, batch_size).double() @ v
           for s in range(0, len(indices), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)
