"""Attack plugins: what each one edits, and that every edit stays inside its budget and storage format."""

from __future__ import annotations

import numpy as np
import pytest

from infusion_audit.attacks import Poisoning
from infusion_audit.behaviour import Target, sample_targets
from infusion_audit.errors import UserError
from infusion_audit.registry import ATTACKS


@pytest.fixture(scope="module")
def target(context):
    return sample_targets(context.test, 1, seed=3)[0]


def test_builtin_attacks_are_registered():
    assert {"infusion", "probe-insertion", "random-noise", "label-flip"} <= set(ATTACKS.names())


def test_target_sampling_is_seeded_and_never_the_true_label(context):
    a = sample_targets(context.test, 20, seed=5)
    assert a == sample_targets(context.test, 20, seed=5)
    assert all(t.cls != t.true == context.test.y[t.index] for t in a)
    every = sample_targets(context.test, 2, rule="all-classes", seed=5)
    assert len(every) == 18 and len({t.index for t in every}) == 2
    assert all(t.cls != t.true for t in every) and len({(t.index, t.cls) for t in every}) == 18
    with pytest.raises(UserError):
        sample_targets(context.test, 10_000)


def test_infusion_stays_on_the_grid_inside_the_budget(context, target):
    attack = ATTACKS.get("infusion")(k=0.01, eps=1 / 16, steps=5, preset="influence")
    p = attack.craft(context, target)
    clean = context.train
    assert len(p.indices) == 14 == len(set(p.indices.tolist()))
    np.testing.assert_array_equal(p.y, clean.y[p.indices])  # clean-label
    np.testing.assert_array_equal(np.sort(p.indices), np.sort(np.argsort(context.scores(target))[:14]))
    norms = p.norms(clean)
    assert norms["linf"] == pytest.approx(1 / 16) and norms["off_grid"] == 0 and norms["out_of_range"] == 0
    assert norms["values_changed"] > 10
    assert p.meta["predicted_delta_f"] > 0


def test_infusion_float_and_l2_budgets(context, target):
    clean = context.train
    p = ATTACKS.get("infusion")(k=5, eps=0.03, quantize=False, steps=5).craft(context, target)
    delta = p.x - clean.x[p.indices]
    assert np.abs(delta).max() <= 0.03 + 1e-6 and p.x.min() >= 0 and p.x.max() <= 1
    assert p.norms(clean)["off_grid"] > 0  # a float edit leaves the 1/16 grid: visible to a defender
    p2 = ATTACKS.get("infusion")(k=5, eps=0.5, norm="l2", quantize=False, steps=5, preset="influence").craft(context, target)
    l2 = np.linalg.norm((p2.x - clean.x[p2.indices]).reshape(5, -1), axis=1)
    assert l2.max() <= 0.5 + 1e-5 and l2.min() > 0.25


def test_baselines_edit_the_same_documents(context, target):
    clean = context.train
    ref = ATTACKS.get("infusion")(k=14, steps=2, preset="influence").craft(context, target)
    noise = ATTACKS.get("random-noise")(k=14).craft(context, target)
    np.testing.assert_array_equal(noise.indices, ref.indices)
    n = noise.norms(clean)
    assert n["linf"] == pytest.approx(1 / 16) and n["off_grid"] == 0 and n["out_of_range"] == 0
    flip = ATTACKS.get("label-flip")(k=14).craft(context, target)
    # the same ranking, skipping documents already of the target class (relabelling them changes nothing)
    assert len(flip.indices) == 14 and (clean.y[flip.indices] != target.cls).all()
    assert set(ref.indices[clean.y[ref.indices] != target.cls]) <= set(flip.indices)
    assert (flip.y == target.cls).all() and flip.norms(clean)["linf"] == 0
    one = ATTACKS.get("probe-insertion")(k=14, copies=1).craft(context, target)
    many = ATTACKS.get("probe-insertion")(k=14).craft(context, target)
    assert len(one.indices) == 1 and len(many.indices) == 14
    np.testing.assert_array_equal(many.x, np.repeat(context.test.x[[target.index]], 14, axis=0))
    assert (many.y == target.cls).all()


def test_selection_rules(context, target):
    s = context.scores(target)
    most_negative = context.select(target, 5, "most-negative", 0)
    assert s[most_negative].max() <= np.sort(s)[4]
    assert s[context.select(target, 5, "most-positive", 0)].min() >= np.sort(s)[-5]
    assert np.abs(s[context.select(target, 5, "most-absolute", 0)]).min() >= np.sort(np.abs(s))[-5]
    r = context.select(target, 5, "random", 0)
    np.testing.assert_array_equal(r, context.select(target, 5, "random", 0))
    assert not np.array_equal(r, context.select(target, 5, "random", 1))


def test_poisoning_applies_in_place_and_budget_errors(context):
    clean = context.train
    p = Poisoning(np.array([2, 7]), clean.x[[2, 7]] + 0.5, np.array([1, 1]))
    poisoned = p.apply(clean)
    assert len(poisoned) == len(clean) and (poisoned.y[[2, 7]] == 1).all()
    assert p.norms(clean)["out_of_range"] > 0
    with pytest.raises(UserError):
        context.budget_k(0)
    with pytest.raises(UserError):
        ATTACKS.get("infusion")(k=3, selection="best").craft(context, Target(0, 1, int(context.test.y[0])))
