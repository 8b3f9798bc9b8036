"""Detectors for text corpora, and what the shared detectors need to run on language models.

Token edits are sparse (a couple of tokens in a document), so the text-native signals are per token:
the most surprising token under the trained model, and, with a trusted copy, the count of changed
tokens. The shared feature-space and loss detectors run unchanged once the context is handed
document features (the final hidden state, as the language-model head reads it, averaged over
real tokens) and document losses: `text_context` builds such a context.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infusion_audit.registry import DETECTORS
from infusion_audit.text.data import TextDataset, tokens_changed
from infusion_audit.text.models import lm_loss

from .base import AuditContext, Detector
from .features import FeatureExtractor
from .influence import InfluenceOutlier


def _batches(dataset: TextDataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        yield dataset.batch(np.arange(start, min(start + batch_size, len(dataset))))


@torch.no_grad()
def document_features(model: nn.Module, dataset: TextDataset, batch_size: int = 256,
                      extractor: FeatureExtractor | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Per document: the final hidden state averaged over real tokens (what `extractor` takes, by default
    the input of the language-model head; None when it takes none) and the mean token loss."""
    model.eval()
    device = next(model.parameters()).device
    extractor = extractor or FeatureExtractor(model)
    feats, losses = [], []
    for ids, mask in _batches(dataset, batch_size):
        ids, mask = ids.to(device), mask.to(device)
        hidden, logits = extractor(input_ids=ids, attention_mask=mask)
        if hidden is not None:
            weights = mask[..., None].float()
            feats.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu().numpy())
        token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        real = mask[:, 1:].float()
        losses.append(((token * real).sum(1) / real.sum(1).clamp_min(1)).cpu().numpy())
    features = np.concatenate(feats) if extractor.problem is None else None
    return features, np.concatenate(losses).astype(np.float64)


def text_context(data: TextDataset, model: nn.Module, reference: TextDataset | None = None, behaviour=None,
                 **kw) -> AuditContext:
    """An audit context for a text corpus: features and losses precomputed, the LM loss for gradients.

    Where no features can be taken from the model, the detectors that read them are skipped with the reason."""
    context = AuditContext(data, model=model, reference=reference, behaviour=behaviour, loss_fn=lm_loss, **kw)
    features, losses = document_features(model, data, context.batch_size, context.extractor)
    return context.provide(losses=losses, **({} if features is None else {"features": features}))


@DETECTORS.register("token-surprisal")
class TokenSurprisal(Detector):
    """The most surprising token of each document under the trained model (an edited token stands out)."""

    needs = frozenset({"model"})
    data_kinds = frozenset({"text"})
    knowledge = "model"

    def __init__(self, top: int = 1):
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        self.top = top

    @torch.no_grad()
    def score(self, context: AuditContext) -> np.ndarray:
        """Mean of the `top` largest token surprisals -log p(token | prefix); padding excluded."""
        model = context.model.eval()
        device = next(model.parameters()).device
        out = []
        for ids, mask in _batches(context.data, context.batch_size):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            surprisal = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            surprisal = surprisal.masked_fill(~mask[:, 1:].bool(), -torch.inf)
            top = surprisal.topk(min(self.top, surprisal.shape[1]), dim=1).values
            out.append(top.masked_fill(~torch.isfinite(top), 0).mean(1).double().cpu().numpy())
        return np.concatenate(out)


@DETECTORS.register("token-diff")
class TokenDiff(Detector):
    """With a trusted reference copy: how many tokens of each document differ from it."""

    needs = frozenset({"reference"})
    data_kinds = frozenset({"text"})
    knowledge = "reference"

    def score(self, context: AuditContext) -> np.ndarray:
        return tokens_changed(context.reference, context.data).astype(np.float64)

    def flag(self, scores: np.ndarray, context: AuditContext) -> np.ndarray:
        return scores > 0


@DETECTORS.register("text-influence")
class TextInfluence(InfluenceOutlier):
    """Influence outliers on a language model: forensic attribution to a text behaviour, or self-influence.

    Forensic: score = -s_i for the behaviour's measurement f (a `CompletionBehaviour` or
    `WordPreference`), the same quantity the attack ranks documents by. Without the behaviour,
    self-influence. (The shared detector's probe mode relabels classes, which text does not have.)
    """

    MODES = ("auto", "forensic", "self")
    data_kinds = frozenset({"text"})

    def resolved_mode(self, context: AuditContext) -> str:
        if self.mode == "auto":
            return "forensic" if context.has("behaviour") else "self"
        return self.mode
