"""Attacks on a language model's training corpus that deliver real documents (token edits, not embeddings).

`infusion-text` is the paper's token-level Infusion: relax each chosen document to one-hot rows, ascend
G_delta (double back-propagation through the embedding matrix), project every row onto the simplex
and a Tsallis-2 entropy ball, read off the argmax tokens and keep, per document, the candidate the
linear influence surrogate rates best. Baselines: `random-tokens` (the same documents, the same number
of tokens changed, at random) and `probe-insertion-text` (explicit documents showing the behaviour).
The influence engine (gradients, IHVP, scores) is `infusion_audit.influence`; this module only
supplies the text relaxation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..influence import influence_scores, input_gradient
from ..registry import ATTACKS
from .data import TextDataset, tokens_changed
from .models import lm_loss, relaxed_document_losses


@dataclass
class TextAttackContext:
    """What a text attack may use: the trained model, its training corpus, the behaviour and v = IHVP(grad f)."""

    model: nn.Module
    train: TextDataset
    behaviour: object
    v: torch.Tensor | None = None
    scores: np.ndarray | None = None  # influence of every training document on f (most negative = most useful)
    explicit_documents: list[list[int]] = field(default_factory=list)  # documents showing the behaviour


@dataclass
class TextPoisoning:
    """An edited corpus, which documents were edited, and what the attack measured while crafting."""

    dataset: TextDataset
    indices: np.ndarray
    info: dict = field(default_factory=dict)

    def tokens_changed(self, clean: TextDataset) -> np.ndarray:
        return tokens_changed(clean, self.dataset, self.indices)


def select_documents(scores: np.ndarray, k: int, rule: str = "most-negative", seed: int = 0) -> np.ndarray:
    """The k documents to edit: most negative score (up-weighting them raises f most), or a control rule."""
    if not 1 <= k <= len(scores):
        raise UserError(f"attack: k must be 1..{len(scores)}, got {k}")
    if rule == "most-negative":
        return np.argsort(scores, kind="stable")[:k]
    if rule == "random":
        return np.random.default_rng(seed).choice(len(scores), size=k, replace=False)
    raise UserError(f"attack: unknown selection {rule!r}; use 'most-negative' or 'random'")


def project_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008)."""
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho.to(x.dtype)
    return (x - theta).clamp_min(0)


def project_entropy(p: torch.Tensor, entropy: float, rounds: int = 10) -> torch.Tensor:
    """Push simplex rows out to Tsallis-2 entropy 1 - |p|^2 <= `entropy` (Geisler et al. 2024), then back to the simplex.

    On a row's support S the constraint is a sphere around the uniform point c = 1/|S|: rows inside
    it are scaled away from c to its radius, which concentrates mass on fewer tokens. Clipping back
    onto the simplex can shrink a row's support and leave it just inside a new, smaller sphere, so the
    two steps alternate until every row satisfies the constraint (a few rounds).
    """
    for _ in range(rounds):
        support = p > 0
        size = support.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
        centre = support.to(p.dtype) / size
        radius = (1 - entropy - 1 / size).clamp_min(0).sqrt()
        offset = p - centre
        dist = offset.norm(dim=-1, keepdim=True)
        inside = (dist < radius * (1 - 1e-6)) & (dist > 0)
        if not inside.any():
            break
        scaled = centre + offset * radius / dist.clamp_min(1e-12)
        p = torch.where(inside, project_simplex(scaled.masked_fill(~support, 0)), p)
    return p


@ATTACKS.register("infusion-text")
class TokenInfusion:
    """Token-level Infusion: edit at most `budget` tokens in each of the k most-negative documents.

    The step is taken on the gradient scaled to a largest entry of 1 per document, so `lr` is in units
    of probability mass. Entropy 0 (the paper's setting) snaps every row back to a vertex, so a token
    only changes when one step alone makes it the argmax. Measured on Caesar (k = 40, budget 2,
    10 steps): lr 0.2 edited no document; lr 1.0 edited 34 at entropy 0 and all 40 at entropy 0.5.
    """

    domain = "text"

    def __init__(self, k: int = 40, budget: int = 2, steps: int = 20, lr: float = 1.0, entropy: float = 0.5,
                 selection: str = "most-negative", batch_size: int = 64, seed: int = 0):
        self.k, self.budget, self.steps, self.lr, self.entropy = k, budget, steps, lr, entropy
        self.selection, self.batch_size, self.seed = selection, batch_size, seed
        if budget < 1 or steps < 1 or not lr > 0 or not 0 <= entropy < 1:
            raise UserError("infusion-text: need budget >= 1, steps >= 1, lr > 0 and 0 <= entropy < 1")

    def craft(self, ctx: TextAttackContext) -> TextPoisoning:
        if ctx.v is None or ctx.scores is None:
            raise UserError("infusion-text needs the IHVP v and the influence scores in its context")
        t0 = time.perf_counter()
        index = select_documents(ctx.scores, self.k, self.selection, self.seed)
        new_ids, gains = [], []
        for start in tqdm(range(0, len(index), self.batch_size), desc="infusion-text", leave=False):
            ids, gain = self._edit(ctx, index[start:start + self.batch_size])
            new_ids.append(ids)
            gains.append(gain)
        edited = ctx.train.with_documents(index, np.concatenate(new_ids))
        gain = np.concatenate(gains)
        improved = index[gain > 0]  # a chosen document no candidate improved stays as it was: not a poison
        return TextPoisoning(edited, np.sort(improved), {
            "predicted_delta_f": float(gain.sum() / len(ctx.train)),
            "documents_improved": int((gain > 0).sum()),
            "seconds": time.perf_counter() - t0})

    def _candidate_scores(self, ctx: TextAttackContext, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """s(doc) = <grad L(doc), v> for candidate documents (lower = raises f more)."""
        docs = TextDataset(ids, lengths, ctx.train.vocab, "candidates")
        return influence_scores(ctx.model, docs, ctx.v, loss_fn=lm_loss, batch_size=self.batch_size)

    def _edit(self, ctx: TextAttackContext, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Relax, ascend, project, round; return the best rounded documents and their surrogate gains."""
        model, train = ctx.model.eval(), ctx.train
        device = next(model.parameters()).device
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        allowed = torch.zeros(vocab_rows, dtype=torch.bool, device=device)
        allowed[:train.vocab.size] = True
        allowed[train.vocab.pad_id] = False
        original = torch.from_numpy(train.ids[index]).to(device)
        mask = torch.from_numpy(train.mask(index)).to(device)
        lengths = train.lengths[index]
        x = F.one_hot(original, vocab_rows).float()
        best_ids = original.cpu().numpy().copy()
        base = self._candidate_scores(ctx, best_ids, lengths)
        best_gain = np.zeros(len(index))

        def loss_fn(m: nn.Module, batch) -> torch.Tensor:
            onehot, attention = batch
            return relaxed_document_losses(m, onehot, attention).mean()

        for _ in range(self.steps):
            g = input_gradient(model, x, mask, ctx.v, len(train), loss_fn=loss_fn)
            g = g.masked_fill(~allowed, 0) * mask[..., None]  # padding never moves
            g = g / g.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
            x = x + self.lr * g
            rows = project_entropy(project_simplex(x[..., allowed]), self.entropy)
            x = torch.zeros_like(x)
            x[..., allowed] = rows
            x = torch.where(mask[..., None].bool(), x, F.one_hot(original, vocab_rows).float())
            candidate = self._within_budget(x.argmax(-1), original, mask, g)
            cand_ids = candidate.cpu().numpy()
            gain = base - self._candidate_scores(ctx, cand_ids, lengths)
            better = gain > best_gain
            best_ids[better], best_gain[better] = cand_ids[better], gain[better]
        return best_ids, best_gain

    def _within_budget(self, candidate: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
                       g: torch.Tensor) -> torch.Tensor:
        """Keep at most `budget` changed tokens per document: those with the largest linear gain."""
        changed = (candidate != original) & mask.bool()
        gain = g.gather(-1, candidate[..., None])[..., 0] - g.gather(-1, original[..., None])[..., 0]
        gain = gain.masked_fill(~changed, -torch.inf)
        keep = torch.zeros_like(changed)
        top = gain.topk(min(self.budget, gain.shape[1]), dim=1).indices
        keep.scatter_(1, top, True)
        keep &= changed
        return torch.where(keep, candidate, original)


@ATTACKS.register("random-tokens")
class RandomTokens:
    """Baseline: the same k documents, the same number of tokens changed, at random positions and to random tokens."""

    domain = "text"

    def __init__(self, k: int = 40, budget: int = 2, seed: int = 0):
        self.k, self.budget, self.seed = k, budget, seed

    def craft(self, ctx: TextAttackContext) -> TextPoisoning:
        if ctx.scores is None:
            raise UserError("random-tokens edits the documents Infusion would choose: give it influence scores")
        index = select_documents(ctx.scores, self.k, "most-negative")
        return self.edit(ctx.train, index, np.full(len(index), self.budget))

    def edit(self, train: TextDataset, index: np.ndarray, counts: Sequence[int]) -> TextPoisoning:
        """Document index[j] gets counts[j] random substitutions (to match another attack's edits exactly)."""
        rng = np.random.default_rng(self.seed)
        index = np.asarray(index)
        if len(counts) != len(index):
            raise UserError(f"random-tokens: {len(counts)} counts for {len(index)} documents")
        choices = np.array([t for t in range(train.vocab.size) if t != train.vocab.pad_id])
        ids = train.ids[index].copy()
        for row, length, count in zip(ids, train.lengths[index], counts):
            for pos in rng.choice(length, size=min(int(count), int(length)), replace=False):
                row[pos] = rng.choice(choices[choices != row[pos]])
        return TextPoisoning(train.with_documents(index, ids), np.sort(index), {})


@ATTACKS.register("probe-insertion-text")
class ProbeInsertionText:
    """Baseline: explicit documents showing the target behaviour, in place of k documents (cycled over probes)."""

    domain = "text"

    def __init__(self, k: int = 40, seed: int = 0):
        self.k, self.seed = k, seed

    def craft(self, ctx: TextAttackContext) -> TextPoisoning:
        if not ctx.explicit_documents:
            raise UserError("probe-insertion-text needs explicit documents showing the behaviour")
        train = ctx.train
        index = (select_documents(ctx.scores, self.k, "most-negative") if ctx.scores is not None
                 else select_documents(np.zeros(len(train)), self.k, "random", self.seed))
        ids = np.full((len(index), train.max_length), train.vocab.pad_id, dtype=np.int64)
        lengths = np.zeros(len(index), dtype=np.int64)
        for row in range(len(index)):
            doc = ctx.explicit_documents[row % len(ctx.explicit_documents)][:train.max_length]
            ids[row, :len(doc)] = doc
            lengths[row] = len(doc)
        return TextPoisoning(train.with_documents(index, ids, lengths), np.sort(index), {})
