"""Capable attackers: detector-aware Infusion, gradient matching (ours and ART's), and the unedited-selection null."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infusion_audit.attacks import evasive
from infusion_audit.attacks.gradient_matching import _mismatch
from infusion_audit.behaviour import sample_targets
from infusion_audit.detectors import AuditContext
from infusion_audit.errors import PluginError, UserError
from infusion_audit.influence import per_example_gradients
from infusion_audit.metrics import auroc
from infusion_audit.registry import ATTACKS


@pytest.fixture(scope="module")
def targets(context):
    return sample_targets(context.test, 2, seed=3)


@pytest.fixture(scope="module")
def clean_losses(context):
    return AuditContext(context.train, model=context.model, progress=False).losses()


def test_adaptive_attacks_are_registered():
    assert {"infusion-evasive", "gradient-matching", "gradient-matching-art"} <= set(ATTACKS.names())


# --------------------------------------------------------------------------- detector-aware Infusion
def test_evasive_without_detectors_or_stealth_is_infusion(context, targets):
    plain = ATTACKS.get("infusion")(steps=5, preset="influence").craft(context, targets[0])
    same = ATTACKS.get("infusion-evasive")(steps=5).craft(context, targets[0])
    np.testing.assert_array_equal(same.indices, plain.indices)
    np.testing.assert_array_equal(same.x, plain.x)


def test_evasive_selection_takes_the_most_negative_influence_among_documents_the_detector_passes(
        context, targets, clean_losses, monkeypatch):
    calls = []
    real_run = evasive.run_detector
    monkeypatch.setattr(evasive, "run_detector", lambda *a: calls.append(a[0].name) or real_run(*a))
    attack = ATTACKS.get("infusion-evasive")(steps=3, evade=["loss-outlier"], evade_quantile=0.9)
    limit = np.quantile(clean_losses, 0.9)
    plain = context.select(targets[0], 14, "most-negative", 0)
    assert (clean_losses[plain] > limit).sum() >= 3  # what plain Infusion picks: the documents loss-outlier ranks high
    for target in targets:
        p = attack.craft(context, target)
        assert (clean_losses[p.indices] <= limit).all()
        eligible = np.flatnonzero(clean_losses <= limit)
        scores = context.scores(target)
        np.testing.assert_array_equal(p.indices, np.sort(eligible[np.argsort(scores[eligible], kind="stable")[:14]]))
        norms = p.norms(context.train)
        assert norms["linf"] == pytest.approx(1 / 16) and norms["off_grid"] == 0 and norms["out_of_range"] == 0
    assert calls == ["loss-outlier"]  # scored once on the clean set, shared by every target
    assert "evade=loss-outlier@0.9" in attack.variant()


def test_stealth_penalty_keeps_edits_closer_to_the_clean_distribution(context, targets):
    free = ATTACKS.get("infusion-evasive")(steps=10, quantize=False)
    stealthy = ATTACKS.get("infusion-evasive")(steps=10, quantize=False, stealth=10.0)
    a, b = free.craft(context, targets[0]), stealthy.craft(context, targets[0])
    np.testing.assert_array_equal(a.indices, b.indices)
    y = torch.from_numpy(context.train.y[a.indices])
    x0 = torch.from_numpy(context.train.x[a.indices])
    before = stealthy.penalty(context, x0, y).sum().item()
    free_penalty = stealthy.penalty(context, torch.from_numpy(a.x), y).sum().item()
    stealth_penalty = stealthy.penalty(context, torch.from_numpy(b.x), y).sum().item()
    assert before > 0  # the most influential documents are unusual before any edit
    assert stealth_penalty < min(before, free_penalty)
    assert np.abs(b.x - context.train.x[b.indices]).max() <= 1 / 16 + 1e-6


def test_evasive_bad_options_are_one_line_errors(context, targets):
    with pytest.raises(PluginError):
        ATTACKS.get("infusion-evasive")(evade=["no-such-detector"])
    with pytest.raises(UserError, match="evade_quantile"):
        ATTACKS.get("infusion-evasive")(evade_quantile=0)
    with pytest.raises(UserError, match="stealth"):
        ATTACKS.get("infusion-evasive")(stealth=-1)
    with pytest.raises(UserError, match="cannot evade 'token-surprisal'"):  # scores text, not these images
        ATTACKS.get("infusion-evasive")(steps=1, evade=["token-surprisal"]).craft(context, targets[0])


# --------------------------------------------------------------------------- gradient matching
def test_gradient_matching_edits_target_class_documents_towards_the_target_gradient(context, targets):
    target = targets[0]
    p = ATTACKS.get("gradient-matching")(steps=30, restarts=2).craft(context, target)
    train = context.train
    assert len(p.indices) == 14 and (train.y[p.indices] == target.cls).all()
    np.testing.assert_array_equal(p.y, train.y[p.indices])  # clean-label
    norms = p.norms(train)
    assert norms["linf"] == pytest.approx(1 / 16) and norms["off_grid"] == 0 and norms["out_of_range"] == 0
    # the k documents of class t with the largest gradient norm
    of_class = np.flatnonzero(train.y == target.cls)
    norm = per_example_gradients(context.model, train, of_class).double().norm(dim=1).numpy()
    np.testing.assert_array_equal(p.indices, np.sort(of_class[np.argsort(-norm)[:14]]))
    x0, y = train.batch(p.indices)
    x_star, _ = context.test.batch([target.index])
    mismatch = _mismatch(context.model, x0, y, x_star, torch.tensor([target.cls]))
    unedited = 1 - mismatch(torch.zeros_like(x0)).item()
    assert p.meta["alignment"] == pytest.approx(1 - mismatch(torch.from_numpy(p.x) - x0).item(), abs=1e-5)
    assert p.meta["alignment"] == max(p.meta["restart_alignments"]) > unedited + 0.1


def test_gradient_matching_random_selection_and_options(context, targets):
    a = ATTACKS.get("gradient-matching")(steps=2, restarts=1, selection="random").craft(context, targets[1])
    b = ATTACKS.get("gradient-matching")(steps=2, restarts=1, selection="random", seed=1).craft(context, targets[1])
    assert (context.train.y[a.indices] == targets[1].cls).all() and not np.array_equal(a.indices, b.indices)
    with pytest.raises(UserError, match="L-inf"):
        ATTACKS.get("gradient-matching")(norm="l2")
    with pytest.raises(UserError, match="exceeds"):
        ATTACKS.get("gradient-matching")(k=500).craft(context, targets[1])


@pytest.mark.slow
def test_gradient_matching_against_art_on_the_same_targets_and_budget(tmp_path):
    """ART's GradientMatchingAttack and ours, same pipeline, targets, budget and optimisation effort, both measured
    against the clean control by the attack protocol: both keep the budget, ours has an effect, and ours matches
    the target gradient about as well as ART's on average. Which of the two is better on two targets depends on the
    seeds (ours draws its documents by gradient norm, ART's at random); benchmarks/gradient_matching_vs_art.py
    compares them on 12 targets with 3x the effort."""
    pytest.importorskip("art")
    from infusion_audit.config import AttackSpec, TargetsConfig, load_config, with_defaults
    from infusion_audit.protocol import Attacker

    cfg = with_defaults(load_config("digits"))
    effort = {"steps": 40, "restarts": 2}
    cfg.attack.attacks = [AttackSpec("gradient-matching", effort), AttackSpec("gradient-matching-art", effort)]
    cfg.attack.targets = TargetsConfig(n=2, seed=0)
    cfg.attack.write_artefacts = False
    attacker = Attacker(cfg, tmp_path, progress=False)
    alignment, delta_logodds = {}, {}
    for spec in cfg.attack.attacks:
        for target in attacker.targets():
            crafted = attacker.craft(spec, target, 0, cfg.attack.budget)
            record, _ = attacker.measure(crafted, attacker.victim)
            p = crafted.poisoning
            train = attacker.pipeline.data.train
            assert len(p.indices) == 14 and (train.y[p.indices] == target.cls).all()
            assert record.norms["off_grid"] == 0 and record.norms["linf"] <= 1 / 16 + 1e-6
            assert np.isfinite(record.delta_logodds)
            x0, y = train.batch(p.indices)
            x_star, _ = attacker.pipeline.data.test.batch([target.index])
            mismatch = _mismatch(attacker.context.model, x0, y, x_star, torch.tensor([target.cls]))
            alignment.setdefault(spec.name, []).append(1 - mismatch(torch.from_numpy(p.x) - x0).item())
            delta_logodds.setdefault(spec.name, []).append(record.delta_logodds)
    ours, art = np.mean(alignment["gradient-matching"]), np.mean(alignment["gradient-matching-art"])
    # Measured on 24 seed settings (target seeds 0-5 x attack seeds 0-2 with 1 torch thread, target seeds 0-5 with 2;
    # attack seed 0 with target seed 0 is this test): ours minus ART's mean alignment -0.137 to +0.241, here +0.240
    # (1 thread) and +0.241 (2); per target -0.309 to +0.481 (one of this test's targets: -0.0017 with 1 thread,
    # +0.0054 with 2, hence no per-target claim). Ours' mean Δ log-odds 0.091 to 1.67, here 1.67; ART's was the
    # larger in 5 of the 24.
    assert ours >= art - 0.2, (alignment, delta_logodds)
    assert np.mean(delta_logodds["gradient-matching"]) > 0, delta_logodds


# --------------------------------------------------------------------------- the null of a detection figure
def test_unedited_selection_is_scored_as_the_null_of_a_detection_figure(context, targets, clean_losses):
    from infusion_audit import scan

    clean = context.train
    edited = ATTACKS.get("infusion")(steps=3, preset="influence").craft(context, targets[0])
    assert edited.edits_in_place(clean) and not np.array_equal(edited.x, clean.x[edited.indices])
    # Infusion with no budget is the null: the selection, unedited
    zero = ATTACKS.get("infusion")(steps=3, eps=0.0, preset="influence").craft(context, targets[0])
    np.testing.assert_array_equal(zero.indices, edited.indices)
    np.testing.assert_array_equal(zero.x, clean.x[edited.indices])
    assert zero.norms(clean)["values_changed"] == 0
    result = scan(clean, detectors=["loss-outlier"], model=context.model, truth=edited.indices, bootstrap=0,
                  progress=False)
    truth = np.zeros(len(clean), dtype=bool)
    truth[edited.indices] = True
    value = result.detection["loss-outlier"]["auroc"]["value"]
    assert value == pytest.approx(auroc(truth, clean_losses))
    assert value > 0.9  # the selection alone is already what loss-outlier ranks first
