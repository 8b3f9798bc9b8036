"""The GCG optimiser of `infusion-text`: budget, padding, and an exact objective that only goes up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infusion_audit.errors import UserError
from infusion_audit.influence import directional_scores, influence_scores, per_example_gradients
from infusion_audit.influence.gradients import num_trainable
from infusion_audit.attacks.text import TokenInfusion
from infusion_audit.text.data import TextDataset, caesar
from infusion_audit.text.models import document_losses, lm_loss, tiny_gpt_neo


class FixedDirection:
    """What the token optimisers ask of an attack context, with a fixed direction v in place of an IHVP."""

    progress = False

    def __init__(self, model, train, v):
        self.model, self.train, self.v = model, train, v
        self.scores = influence_scores(model, train, v, loss_fn=lm_loss)

    def budget_k(self, k: int) -> int:
        return k

    def query(self, target, curvature: str) -> torch.Tensor:
        return self.v

    def pool(self) -> np.ndarray:
        return np.arange(len(self.train))

    def select(self, target, k: int, rule: str, seed: int, curvature: str) -> np.ndarray:
        return np.sort(np.argsort(self.scores, kind="stable")[:k])


@pytest.fixture(scope="module")
def context() -> FixedDirection:
    """A small Caesar corpus with ragged lengths (so there is padding), a tiny model and a fixed direction v."""
    train = caesar(n_train=60, n_test=10, alphabet=5, length=3, min_shift=1, max_shift=2, seed=0).train
    lengths = train.lengths - np.arange(len(train)) % 3  # drop up to 2 trailing tokens: they become padding
    ids = np.where(np.arange(train.max_length)[None] < lengths[:, None], train.ids, train.vocab.pad_id)
    train = type(train)(ids, lengths, train.vocab, "ragged")
    torch.manual_seed(0)
    model = tiny_gpt_neo(train.vocab.size, train.max_length, hidden=16, layers=1, heads=2).eval()
    v = torch.randn(num_trainable(model), generator=torch.Generator().manual_seed(1))
    return FixedDirection(model, train, v)


def _exact_gain(ctx: FixedDirection, poisoning) -> float:
    """s(original) - s(edited), summed over the edited documents: the objective both optimisers maximise."""
    index = poisoning.indices
    before = influence_scores(ctx.model, ctx.train, ctx.v, index, loss_fn=lm_loss)
    after = influence_scores(ctx.model, poisoning.apply(ctx.train), ctx.v, index, loss_fn=lm_loss)
    return float((before - after).sum())


@pytest.mark.parametrize("tokens", [1, 2])
def test_gcg_respects_the_budget_never_touches_padding_and_only_improves(context, tokens):
    ctx, train = context, context.train
    poisoning = TokenInfusion(k=12, tokens=tokens, steps=4, candidates=16, top_k=3).craft(ctx, None)
    changed = poisoning.tokens_changed(train)
    assert len(poisoning.indices) == poisoning.meta["documents_improved"] > 0
    assert 0 < changed.min() and changed.max() <= tokens
    padding = ~train.mask()
    poisoned = poisoning.apply(train)
    assert padding.any() and np.array_equal(poisoned.ids[padding], train.ids[padding])
    untouched = np.setdiff1d(np.arange(len(train)), poisoning.indices)
    assert np.array_equal(poisoned.ids[untouched], train.ids[untouched])
    after = influence_scores(ctx.model, poisoned, ctx.v, poisoning.indices, loss_fn=lm_loss)
    assert np.all(after < ctx.scores[poisoning.indices])  # every kept edit raises the exact objective
    assert poisoning.meta["predicted_delta_f"] == pytest.approx(_exact_gain(ctx, poisoning) / len(train), rel=1e-4)


def test_gcg_beats_the_relaxed_optimiser_on_a_fixed_case(context):
    gcg = TokenInfusion(k=12, tokens=2, steps=6, candidates=64, top_k=4).craft(context, None)
    relaxed = TokenInfusion(k=12, tokens=2, steps=20, optimizer="relaxed").craft(context, None)
    assert _exact_gain(context, gcg) >= _exact_gain(context, relaxed) > 0


def test_gcg_options_are_checked():
    with pytest.raises(UserError, match="optimizer"):
        TokenInfusion(optimizer="adam")
    with pytest.raises(UserError, match="candidates"):
        TokenInfusion(candidates=0)
    with pytest.raises(UserError, match="objective"):
        TokenInfusion(objective="loss")
    with pytest.raises(UserError, match="selection"):
        TokenInfusion(selection="best")


def test_forward_mode_and_cosine_scores_equal_the_per_document_gradients(context):
    ctx = context
    grads = per_example_gradients(ctx.model, ctx.train, loss_fn=lm_loss).double()
    exact = (grads @ ctx.v.double()).numpy()
    forward = directional_scores(ctx.model, ctx.train, ctx.v.double(), document_losses, batch_size=7)  # ragged
    np.testing.assert_allclose(forward, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
    cosine = influence_scores(ctx.model, ctx.train, ctx.v, loss_fn=lm_loss, cosine=True)
    np.testing.assert_allclose(cosine, exact / grads.norm(dim=1).numpy(), rtol=1e-6)
    assert np.all(np.abs(cosine) <= ctx.v.norm().item() + 1e-9)


def _every_swap(train, index: int) -> np.ndarray:
    """Every single-token swap of document `index` to another non-padding token (one row each)."""
    rows = []
    for pos in range(train.lengths[index]):
        for token in range(train.vocab.size):
            if token not in (train.vocab.pad_id, train.ids[index, pos]):
                row = train.ids[index].copy()
                row[pos] = token
                rows.append(row)
    return np.array(rows)


def test_most_improvable_takes_the_documents_whose_best_swap_gains_most(context):
    """With a screen that covers every swap, the selection is the top k of a brute-force search."""
    ctx, train = context, context.train
    best = np.zeros(len(train))
    for i in range(len(train)):
        swaps = _every_swap(train, i)
        docs = TextDataset(swaps, np.full(len(swaps), train.lengths[i]), train.vocab, "swaps")
        best[i] = ctx.scores[i] - directional_scores(ctx.model, docs, ctx.v, document_losses).min()
    every = train.max_length * train.vocab.size
    attack = TokenInfusion(k=6, tokens=1, steps=1, selection="most-improvable", top_k=train.vocab.size,
                           screen=every, candidates=every)
    poisoning = attack.craft(ctx, None)
    np.testing.assert_array_equal(poisoning.indices, np.sort(np.argsort(-best, kind="stable")[:6]))
    gained = ctx.scores[poisoning.indices] - influence_scores(ctx.model, poisoning.apply(train), ctx.v,
                                                               poisoning.indices, loss_fn=lm_loss)
    np.testing.assert_allclose(gained, best[poisoning.indices], rtol=1e-4)  # and the swap is the best one
    assert gained.min() > np.median(best)  # unlike the most negative documents', these swaps are the top
    assert attack.variant() == "gcg, most-improvable"


def test_the_cosine_objective_improves_every_edited_documents_cosine(context):
    ctx, train = context, context.train
    attack = TokenInfusion(k=12, tokens=2, steps=4, candidates=16, top_k=3, objective="cosine")
    poisoning = attack.craft(ctx, None)
    before = influence_scores(ctx.model, train, ctx.v, poisoning.indices, loss_fn=lm_loss, cosine=True)
    after = influence_scores(ctx.model, poisoning.apply(train), ctx.v, poisoning.indices, loss_fn=lm_loss,
                             cosine=True)
    assert len(poisoning.indices) > 0 and np.all(after < before)
    assert "predicted_delta_f" not in poisoning.meta  # a cosine gain is not a change of f
    assert attack.variant() == "gcg, cosine"
