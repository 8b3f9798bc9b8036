"""Attacks on a language model's training corpus that deliver real documents (token edits, not embeddings).

`infusion-text` is token-level Infusion with two optimisers. `gcg` (greedy coordinate gradient, Zou et
al. 2023): rank single-token swaps by G_delta (double back-propagation through the embedding matrix),
score a batch of the top-ranked swaps exactly with per-document gradients, keep the best, repeat within
the token budget. `relaxed` (the paper's): ascend G_delta on one-hot rows, project every row onto the
simplex and a Tsallis-2 entropy ball, read off the argmax tokens and keep, per document, the candidate
the influence surrogate rates best. Baselines: `random-tokens` (the same documents, the same number
of tokens changed, at random) and `probe-insertion-text` (explicit documents showing the behaviour).
The influence engine (gradients, IHVP, scores) is `infusion_audit.influence`; this module only
supplies the text relaxation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from infusion_audit.errors import UserError
from infusion_audit.influence import directional_scores, influence_scores, input_gradient
from infusion_audit.registry import ATTACKS
from infusion_audit.text.data import TextDataset, tokens_changed
from infusion_audit.text.models import document_losses, lm_loss, relaxed_document_losses

from .base import Attack, AttackContext, Curvature, Poisoning, Selection


@dataclass
class TextPoisoning(Poisoning):
    """Documents `indices` of a corpus rewritten as token ids `x` (rows padded to the corpus' length) with
    `lengths` real tokens each; `in_place` edits keep each document and change some of its tokens."""

    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    in_place: bool = True

    @classmethod
    def from_dataset(cls, clean: TextDataset, edited: TextDataset, indices: np.ndarray, meta: dict | None = None,
                     in_place: bool = True) -> "TextPoisoning":
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        return cls(indices, edited.ids[indices].copy(), np.zeros(len(indices), np.int64), dict(meta or {}),
                   edited.lengths[indices].copy(), in_place)

    def apply(self, clean: TextDataset) -> TextDataset:
        return clean.with_documents(self.indices, self.x, self.lengths)

    def edits_in_place(self, clean: TextDataset) -> bool:
        return self.in_place

    def tokens_changed(self, clean: TextDataset) -> np.ndarray:
        return tokens_changed(clean, self.apply(clean), self.indices)

    def norms(self, clean: TextDataset) -> dict:
        """Tokens changed per edited document (mean and most); no value range or grid applies to token ids."""
        changed = self.tokens_changed(clean)
        return {"linf": None, "l2": None, "values_changed": float(changed.mean()) if len(changed) else 0.0,
                "tokens_changed_max": int(changed.max()) if len(changed) else 0, "off_grid": 0, "out_of_range": 0}


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
class TokenInfusion(Attack):
    """Token-level Infusion: edit at most `tokens` tokens in each of k documents.

    Both optimisers maximise the same exact objective per document, s(doc) - s(doc') with
    s = <grad_theta L, v> (the influence surrogate of replacing doc by doc'), and keep a document
    unchanged when nothing improves it. `gcg`: each step ranks the swaps (position, token) by the
    linear gain G_delta[pos, token] - G_delta[pos, current], takes the `top_k` tokens per position,
    scores `candidates` of those swaps (drawn at random, as in GCG) exactly, and applies the best;
    once `budget` positions differ from the original only those positions can change again. It stops
    after `steps` steps or when no document improves. `relaxed` (the paper's): the step is taken on the
    gradient scaled to a largest entry of 1 per document, so `lr` is in units of probability mass;
    entropy 0 snaps every row back to a vertex, so a token only changes when one step alone makes it the
    argmax (on Caesar, k = 40, budget 2, 10 steps: lr 0.2 edited no document, lr 1.0 edited 34).

    Which documents: `selection` most-negative (the paper's) edits the documents that already help f;
    `most-improvable` screens every document with one GCG step of `screen` swaps and edits the k whose
    best swap gains most. `objective: cosine` scores s / |grad L| instead of s: raw influence grows with
    the gradient's norm, so it prefers absurd edits whose gradients are huge in any direction.
    On bench-caesar (12 targets, 3 random seeds each) the paper's choices (most-negative, influence) did
    not beat random edits of the same documents (+2.96 [-1.84, 7.75], p = 0.34): the selection did the
    work. Figures for most-improvable with the cosine objective: README.

    `curvature` is how the query v is made from grad f (`AttackContext.query`): `influence` (the paper's
    EK-FAC inverse Hessian, retraining to convergence) or `adam` (the victim's Adam second moments at its
    retrain start: what one Adam step on the edited document does to f, the paper's retrain being its last
    segment of Adam steps). On bench-wordpref's segment the adam query moved f several times more (README).

    `tokens` below 1 is a share of each document's real tokens (0.08: the paper's 8%, rounded, at least
    one). `words` restricts the edit to a word family: only positions holding one of these words change,
    and only to another of them (swapping "cat" for "dog" keeps a story a story).
    """

    data_kinds = frozenset({"text"})

    def __init__(self, k: int | float = 40, tokens: int | float = 2, steps: int = 20, lr: float = 1.0,
                 entropy: float = 0.5, selection: str = "most-negative", batch_size: int = 64, seed: int = 0,
                 optimizer: str = "gcg", candidates: int = 64, top_k: int = 4, screen: int = 16,
                 objective: str = "influence", words: Sequence[str] | None = None, curvature: str = "influence"):
        self.k, self.tokens, self.steps, self.lr, self.entropy = k, tokens, steps, lr, entropy
        self.words = None if words is None else list(words)
        self.selection, self.batch_size, self.seed = selection, batch_size, seed
        self.optimizer, self.candidates, self.top_k, self.screen = optimizer, candidates, top_k, screen
        self.objective, self.curvature = objective, curvature
        if curvature not in get_args(Curvature):
            raise UserError(f"infusion-text: unknown curvature {curvature!r}; use {' or '.join(get_args(Curvature))}")
        if not (0 < tokens < 1 or tokens >= 1 and tokens == int(tokens)):
            raise UserError(f"infusion-text: tokens must be a count >= 1 or a share in (0, 1), got {tokens}")
        if steps < 1 or not lr > 0 or not 0 <= entropy < 1:
            raise UserError("infusion-text: need steps >= 1, lr > 0 and 0 <= entropy < 1")
        if words is not None and len(set(words)) < 2:
            raise UserError("infusion-text: words must name at least two different words")
        if optimizer not in ("gcg", "relaxed"):
            raise UserError(f"infusion-text: unknown optimizer {optimizer!r}; use 'gcg' or 'relaxed'")
        if candidates < 1 or top_k < 1 or screen < 1:
            raise UserError("infusion-text: need candidates >= 1, top_k >= 1 and screen >= 1")
        if objective not in ("influence", "cosine"):
            raise UserError(f"infusion-text: unknown objective {objective!r}; use 'influence' or 'cosine'")
        if selection not in (*get_args(Selection), "most-improvable"):
            raise UserError(f"infusion-text: unknown selection {selection!r}; use most-improvable or one of "
                            f"{', '.join(get_args(Selection))}")

    def variant(self) -> str:
        return ", ".join([self.optimizer] + [s for s in (self.selection, self.objective, self.curvature)
                                              if s not in ("most-negative", "influence")])

    def craft(self, context: AttackContext, target) -> TextPoisoning:
        # the IHVP is timed by the context
        ctx = _Corpus(context.model, context.train, context.query(target, curvature=self.curvature), context.progress)
        k, t0 = context.budget_k(self.k), time.perf_counter()
        if self.selection == "most-improvable":
            index = self._most_improvable(ctx, context.pool(), k)
        else:
            index = context.select(target, k, self.selection, self.seed, curvature=self.curvature)
        t_select, t0 = time.perf_counter() - t0, time.perf_counter()
        edit = self._gcg if self.optimizer == "gcg" else self._relaxed
        new_ids, gains = [], []
        for start in tqdm(range(0, len(index), self.batch_size), desc=f"infusion-text ({self.optimizer})",
                          leave=False, disable=not ctx.progress):
            ids, gain = edit(ctx, index[start:start + self.batch_size])
            new_ids.append(ids)
            gains.append(gain)
        edited = ctx.train.with_documents(index, np.concatenate(new_ids))
        gain = np.concatenate(gains)
        improved = index[gain > 0]  # a chosen document no candidate improved stays as it was: not a poison
        meta = {"documents_improved": int((gain > 0).sum()),
                "timings": {"select": t_select, "pgd": time.perf_counter() - t0}}
        if self.objective == self.curvature == "influence":  # a cosine or Adam-step gain is not the influence prediction
            meta["predicted_delta_f"] = float(gain.sum() / len(ctx.train))
        return TextPoisoning.from_dataset(ctx.train, edited, improved, meta)

    def _candidate_scores(self, ctx: "_Corpus", ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """s(doc) = <grad L(doc), v> for candidate documents, or its cosine (lower = raises f more)."""
        docs = TextDataset(ids, lengths, ctx.train.vocab, "candidates")
        if self.objective == "cosine":
            return influence_scores(ctx.model, docs, ctx.v, loss_fn=lm_loss, cosine=True)
        return directional_scores(ctx.model, docs, ctx.v, document_losses)

    def _most_improvable(self, ctx: "_Corpus", pool: np.ndarray, k: int) -> np.ndarray:
        """The k documents whose best single swap gains the most, exactly scored: one GCG step over the corpus.

        The most-negative documents are the ones that already help f; with a budget of a few tokens the
        edit that helps f most is often in another document (on Caesar, a document of the target shift
        whose shift digit is rewritten is an example of the behaviour). Each document gets `screen`
        candidate swaps drawn as GCG draws them, scored exactly; the first-order gain of the linear
        ranking alone misses such swaps (top_k must then cover the vocabulary).
        """
        gains = np.zeros(len(pool))
        for start in tqdm(range(0, len(pool), self.batch_size), desc="infusion-text (screen)", leave=False,
                          disable=not ctx.progress):
            _, gains[start:start + self.batch_size] = self._gcg(ctx, pool[start:start + self.batch_size], steps=1,
                                                                candidates=self.screen)
        return np.sort(pool[np.argsort(-gains, kind="stable")[:k]])

    def budgets(self, lengths: np.ndarray) -> np.ndarray:
        return token_budgets(self.tokens, lengths)

    def word_ids(self, vocab) -> list[int] | None:
        """The first token of each of `words` (None: every token may be edited and written)."""
        if self.words is None:
            return None
        from infusion_audit.text.behaviours import word_token

        return sorted({word_token(vocab, w) for w in self.words})

    def _setup(self, ctx: "_Corpus", index: np.ndarray):
        """The documents as tensors, the tokens an edit may write, and G_delta of one-hot rows. `mask` is False
        on padding and, with `words`, on every position that holds none of them (it is not the attention mask)."""
        model, train = ctx.model.eval(), ctx.train
        device = next(model.parameters()).device
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        allowed = torch.zeros(vocab_rows, dtype=torch.bool, device=device)
        family = self.word_ids(train.vocab)
        if family is None:
            allowed[:train.vocab.size] = True
        else:
            allowed[family] = True
        allowed[train.vocab.pad_id] = False
        original = torch.from_numpy(train.ids[index]).to(device)
        attention = torch.from_numpy(train.mask(index)).to(device)
        mask = attention & allowed[original] if family is not None else attention
        self._budget = torch.from_numpy(self.budgets(train.lengths[index])).to(device)
        v = ctx.v.to(device)  # once, not at every step (the exact scores take ctx.v on the CPU)

        def loss_fn(m: nn.Module, batch) -> torch.Tensor:
            onehot, attention = batch
            return relaxed_document_losses(m, onehot, attention).mean()

        def gradient(x: torch.Tensor) -> torch.Tensor:
            g = input_gradient(model, x, attention, v, len(train), loss_fn=loss_fn)
            return g.masked_fill(~allowed, 0) * mask[..., None]  # padding (and, with words, other words) never moves

        return original, mask, allowed, vocab_rows, gradient

    def _gcg(self, ctx: "_Corpus", index: np.ndarray, steps: int | None = None,
             candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Greedy coordinate gradient: per step, score sampled top-k swaps exactly and keep each document's best."""
        original, mask, allowed, vocab_rows, gradient = self._setup(ctx, index)
        lengths = ctx.train.lengths[index]
        candidates = self.candidates if candidates is None else candidates
        rng = torch.Generator().manual_seed(self.seed)
        current = original.clone()
        base = self._candidate_scores(ctx, current.cpu().numpy(), lengths)
        score = base.copy()
        rows = torch.arange(len(index), device=original.device)
        for _ in range(self.steps if steps is None else steps):
            g = gradient(F.one_hot(current, vocab_rows).float())
            gain = g - g.gather(-1, current[..., None])  # linear gain of writing token t at each position
            changed = current != original
            full = changed.sum(1, keepdim=True) >= self._budget[:, None]  # a full budget only re-edits edited positions
            editable = mask.bool() & (~full | changed)
            gain = gain.masked_fill(~allowed | ~editable[..., None], -torch.inf)
            gain = gain.scatter(-1, current[..., None], -torch.inf)  # a swap must change the token
            top = gain.topk(min(self.top_k, vocab_rows), dim=-1)  # (B, L, top_k)
            valid = torch.isfinite(top.values).flatten(1)
            tokens = top.indices.flatten(1)
            noise = torch.rand(valid.shape, generator=rng).to(valid.device)
            pick = noise.masked_fill(~valid, -1).topk(min(candidates, valid.shape[1]), dim=1).indices
            picked_valid = valid.gather(1, pick)  # (B, C): fewer valid swaps than candidates leaves some unused
            position = pick // top.indices.shape[-1]
            swapped = current[:, None, :].repeat(1, pick.shape[1], 1)
            swapped.scatter_(2, position[..., None], tokens.gather(1, pick)[..., None])
            flat = swapped[picked_valid]
            if len(flat) == 0:
                break
            owner = rows[:, None].expand_as(pick)[picked_valid].cpu().numpy()
            exact = self._candidate_scores(ctx, flat.cpu().numpy(), lengths[owner])
            best = np.full(len(index), np.inf)
            best_row = np.full(len(index), -1)
            for j, (doc, s) in enumerate(zip(owner, exact)):
                if s < best[doc]:
                    best[doc], best_row[doc] = s, j
            better = best < score
            if not better.any():
                break
            for doc in np.flatnonzero(better):
                current[doc] = flat[best_row[doc]]
            score[better] = best[better]
        return current.cpu().numpy(), base - score

    def _relaxed(self, ctx: "_Corpus", index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Relax, ascend, project, round; return the best rounded documents and their surrogate gains."""
        original, mask, allowed, vocab_rows, gradient = self._setup(ctx, index)
        lengths = ctx.train.lengths[index]
        x = F.one_hot(original, vocab_rows).float()
        best_ids = original.cpu().numpy().copy()
        base = self._candidate_scores(ctx, best_ids, lengths)
        best_gain = np.zeros(len(index))
        for _ in range(self.steps):
            g = gradient(x)
            g = g / g.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
            x = x + self.lr * g
            rows = project_entropy(project_simplex(x[..., allowed]), self.entropy)
            x = torch.zeros_like(x)
            x[..., allowed] = rows
            x = torch.where(mask[..., None].bool(), x, F.one_hot(original, vocab_rows).float())  # only editable rows move
            candidate = self._within_budget(x.argmax(-1), original, mask, g)
            cand_ids = candidate.cpu().numpy()
            gain = base - self._candidate_scores(ctx, cand_ids, lengths)
            better = gain > best_gain
            best_ids[better], best_gain[better] = cand_ids[better], gain[better]
        return best_ids, best_gain

    def _within_budget(self, candidate: torch.Tensor, original: torch.Tensor, mask: torch.Tensor,
                       g: torch.Tensor) -> torch.Tensor:
        """Keep at most each document's budget of changed tokens: those with the largest linear gain."""
        changed = (candidate != original) & mask.bool()
        gain = g.gather(-1, candidate[..., None])[..., 0] - g.gather(-1, original[..., None])[..., 0]
        gain = gain.masked_fill(~changed, -torch.inf)
        keep = torch.zeros_like(changed)
        top = gain.topk(min(int(self._budget.max()), gain.shape[1]), dim=1).indices
        ranks = torch.arange(top.shape[1], device=top.device)[None, :] < self._budget[:, None]
        keep.scatter_(1, top, ranks)
        keep &= changed
        return torch.where(keep, candidate, original)


def token_budgets(tokens: int | float, lengths: np.ndarray) -> np.ndarray:
    """Tokens each document may change: `tokens`, or that share of its length (rounded, at least 1)."""
    lengths = np.asarray(lengths)
    if tokens >= 1:
        return np.full(len(lengths), int(tokens), dtype=np.int64)
    return np.maximum(1, np.round(tokens * lengths)).astype(np.int64)


class _Corpus(NamedTuple):
    """What the token optimisers read: the attacked model, its corpus, v = IHVP(grad f), whether to show progress."""

    model: nn.Module
    train: TextDataset
    v: torch.Tensor
    progress: bool = True


@ATTACKS.register("random-tokens")
class RandomTokens(Attack):
    """Baseline: the documents Infusion edits, as many tokens changed in each, at random positions and to random tokens.

    With `like` (an attack name, by default infusion-text) the evaluation hands it that arm's poisoning of
    the same target and seed: the same documents and token counts, so the difference is the choice of
    tokens. Alone, it edits the k most-negative documents, `tokens` tokens each (or that share of each). With `words`, as Infusion's
    option: only positions holding one of these words change, each to another of them at random."""

    data_kinds = frozenset({"text"})

    def __init__(self, k: int | float = 40, tokens: int | float = 2, seed: int = 0, like: str | None = "infusion-text",
                 words: Sequence[str] | None = None):
        self.k, self.tokens, self.seed, self.like = k, tokens, seed, like
        self.words = None if words is None else list(words)

    def craft(self, context: AttackContext, target, like: TextPoisoning | None = None) -> TextPoisoning:
        if like is not None:
            return self.edit(context.train, like.indices, like.tokens_changed(context.train))
        index = context.select(target, context.budget_k(self.k), "most-negative", self.seed)
        return self.edit(context.train, index, token_budgets(self.tokens, context.train.lengths[index]))

    def edit(self, train: TextDataset, index: np.ndarray, counts: Sequence[int]) -> TextPoisoning:
        """Document index[j] gets counts[j] random substitutions (to match another attack's edits exactly)."""
        rng = np.random.default_rng(self.seed)
        index = np.asarray(index)
        if len(counts) != len(index):
            raise UserError(f"random-tokens: {len(counts)} counts for {len(index)} documents")
        if self.words is None:
            choices = np.array([t for t in range(train.vocab.size) if t != train.vocab.pad_id])
        else:
            from infusion_audit.text.behaviours import word_token

            choices = np.array(sorted({word_token(train.vocab, w) for w in self.words}))
        ids = train.ids[index].copy()
        for row, length, count in zip(ids, train.lengths[index], counts):
            where = np.arange(length) if self.words is None else np.flatnonzero(np.isin(row[:length], choices))
            for pos in rng.choice(where, size=min(int(count), len(where)), replace=False):
                row[pos] = rng.choice(choices[choices != row[pos]])
        return TextPoisoning.from_dataset(train, train.with_documents(index, ids), index)


@ATTACKS.register("probe-insertion-text")
class ProbeInsertionText(Attack):
    """Baseline: explicit documents showing the target behaviour, in place of the k most-negative documents
    (cycled over the probes)."""

    data_kinds = frozenset({"text"})

    def __init__(self, k: int | float = 40, seed: int = 0):
        self.k, self.seed = k, seed

    def craft(self, context: AttackContext, target) -> TextPoisoning:
        explicit = context.behaviour(target).explicit_documents
        if not explicit:
            raise UserError("probe-insertion-text needs explicit documents showing the behaviour")
        train = context.train
        index = context.select(target, context.budget_k(self.k), "most-negative", self.seed)
        ids = np.full((len(index), train.max_length), train.vocab.pad_id, dtype=np.int64)
        lengths = np.zeros(len(index), dtype=np.int64)
        for row in range(len(index)):
            doc = explicit[row % len(explicit)][:train.max_length]
            ids[row, :len(doc)] = doc
            lengths[row] = len(doc)
        return TextPoisoning.from_dataset(train, train.with_documents(index, ids, lengths), index, in_place=False)
