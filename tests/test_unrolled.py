"""Unrolled retraining (attacks/unrolled.py): the replay is the victim's retrain, the adjoint is the exact
derivative of the retrained measurement, and Infusion's `objective: unrolled` edits within its budget."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from infusion_audit.attacks.unrolled import Replay, feasible_gain, final_gradient
from infusion_audit.behaviour import sample_targets
from infusion_audit.errors import UserError
from infusion_audit.influence import flatten, trainable_parameters, unflatten
from infusion_audit.registry import ATTACKS


@pytest.fixture(scope="module")
def target(context):
    return sample_targets(context.test, 1, seed=3)[0]


@pytest.fixture(scope="module")
def replay(context):
    return Replay(context.pipeline, context.trained.checkpoint(context.epoch - 1), epochs=1)


def test_replay_is_the_retrain(context, replay):
    traj = replay.run(context.train)
    retrained = context.pipeline.continue_training(context.trained.checkpoint(context.epoch - 1), context.train)
    theta = flatten([p.detach() for p in trainable_parameters(retrained).values()])
    assert len(traj.steps) == -(-len(context.train) // context.pipeline.train_cfg.batch_size)
    torch.testing.assert_close(traj.final, theta, atol=1e-6, rtol=0)
    assert sorted(traj.visits) == list(range(len(context.train)))  # one epoch: every document seen once


def test_adjoint_is_the_derivative_through_the_whole_retrain(context, replay, target):
    """d f(theta_T) / d x_j by the adjoint equals autograd through every SGD step (create_graph), for
    documents seen early, midway and last in the epoch."""
    train, behaviour = context.train, context.behaviour(target)
    traj = replay.run(train)
    adjoint = replay.adjoint(traj, train, final_gradient(replay, traj, behaviour))
    docs = [int(traj.steps[s].index[0]) for s in (0, len(traj.steps) // 2, len(traj.steps) - 1)]
    x_leaf = torch.from_numpy(train.x[docs].copy()).requires_grad_(True)
    theta = replay.theta0.clone().requires_grad_(True)
    for step in traj.steps:
        x, y = train.batch(step.index)
        rows = [i for i, j in enumerate(step.index) if j in docs]
        if rows:
            x = x.clone()
            for i in rows:
                x[i] = x_leaf[docs.index(int(step.index[i]))]
        loss = F.cross_entropy(functional_call(replay.model, unflatten(replay.model, theta), (x,)), y)
        (g,) = torch.autograd.grad(loss, [theta], create_graph=True)
        theta = theta - step.lr * g
    model = replay.model
    f = torch.log_softmax(functional_call(model, unflatten(model, theta),
                                          (torch.from_numpy(behaviour.x)[None],)), -1)[0, behaviour.cls]
    (truth,) = torch.autograd.grad(f, [x_leaf])
    ours = torch.from_numpy(adjoint.input_gradient[docs])
    torch.testing.assert_close(ours, truth, rtol=1e-3, atol=1e-3 * float(truth.abs().max()))
    assert float(ours.abs().sum()) > 0


def test_keep_accuracy_turns_the_ascent_against_the_clean_loss(context, replay, target):
    """With keep_accuracy = mu the attack ascends f less mu times the clean loss's gradient at the same norm as f's:
    its first-order change of the clean loss falls by mu |grad f| |grad L| (0 leaves f alone)."""
    train, behaviour = context.train, context.behaviour(target)
    traj = replay.run(train)
    plain = final_gradient(replay, traj, behaviour)
    assert torch.equal(final_gradient(replay, traj, behaviour, train, 0.0), plain)
    kept = final_gradient(replay, traj, behaviour, train, 2.0)
    leaf, pdict = replay.fn.params(traj.final, requires_grad=True)
    index = np.sort(np.random.default_rng(0).choice(len(train), min(1024, len(train)), replace=False))
    (clean,) = torch.autograd.grad(replay.fn.loss(pdict, train.batch(index)), [leaf])
    drop = float(plain @ clean - kept @ clean)
    assert drop == pytest.approx(2.0 * float(plain.norm() * clean.norm()), rel=1e-4)
    assert ATTACKS.get("infusion")(keep_accuracy=2.0).variant() == "quantized,keep_accuracy=2"


def test_feasible_gain_respects_the_value_range():
    grad = np.array([[1.0, -1.0, 2.0, -2.0]])
    x0 = np.array([[0.0, 0.0, 1.0, 0.5]])
    # up from 0 (room 0.1), down from 0 (none), up from 1 (none), down from 0.5 (room 0.1)
    assert feasible_gain(grad, x0, 0.1)[0] == pytest.approx(0.1 + 0 + 0 + 0.2)


def test_unrolled_infusion_stays_on_the_grid_inside_the_budget(context, target):
    clean = context.train
    for params in ({"selection": "gain"}, {"selection": "most-negative", "rounds": 2}):
        attack = ATTACKS.get("infusion")(k=14, eps=1 / 16, steps=4, objective="unrolled", **params)
        p = attack.craft(context, target)
        assert len(p.indices) == 14 == len(set(p.indices.tolist()))
        np.testing.assert_array_equal(p.y, clean.y[p.indices])  # clean-label
        norms = p.norms(clean)
        assert norms["linf"] <= 1 / 16 + 1e-6 and norms["off_grid"] == 0 and norms["out_of_range"] == 0
        assert norms["values_changed"] > 5
        assert p.meta["predicted_delta_f"] > 0


def test_a_surrogate_is_the_recipe_under_another_seed_replayed_in_its_own_order(context, target):
    """`surrogates`: the attacker trains the recipe under seeds of its own to the retrain's start, replays each
    one's last epoch in that seed's order, and sums the objective over them and its own model's retrain."""
    from infusion_audit.attacks.unrolled import replay_for

    replay, traj = replay_for(context, surrogate_seed=20_000)
    cfg = dataclasses.replace(context.pipeline.config, train=dataclasses.replace(context.pipeline.train_cfg,
                                                                                 seed=20_000))
    other = type(context.pipeline)(cfg, data=context.pipeline.data)
    expected = other.fit(other.new_model(), context.train)  # the same recipe, trained through to the end
    torch.testing.assert_close(traj.final, flatten([p.detach() for p in trainable_parameters(expected).values()]),
                               atol=1e-5, rtol=0)
    assert replay.start.epoch == context.epoch - 1
    own_order = Replay(context.pipeline, context.trained.checkpoint(context.epoch - 1)).run(context.train).steps
    assert [s.index.tolist() for s in traj.steps] != [s.index.tolist() for s in own_order]
    assert replay_for(context, surrogate_seed=20_000)[1] is traj  # trained once per context
    p = ATTACKS.get("infusion")(k=14, eps=1 / 16, steps=4, surrogates=1).craft(context, target)
    assert len(p.indices) == 14 and p.norms(context.train)["linf"] <= 1 / 16 + 1e-6
    assert p.meta["predicted_delta_f"] > 0


def test_unrolled_refuses_what_it_cannot_replay(context):
    cfg = dataclasses.replace(context.pipeline.config,
                              train=dataclasses.replace(context.pipeline.train_cfg, momentum=0.9))
    pipeline = type(context.pipeline)(cfg, data=context.pipeline.data)
    with pytest.raises(UserError, match="momentum") as info:
        Replay(pipeline, context.trained.checkpoint(1))
    assert "\n" not in str(info.value)


def test_presets_fix_the_recipe_unless_told_otherwise():
    infusion = ATTACKS.get("infusion")
    paper = infusion(preset="paper")
    assert (paper.objective, paper.damping, paper.steps, paper.step, paper.selection) == \
        ("influence", 1e-8, 50, 0.001, "most-negative")
    assert infusion(preset="paper", steps=10).steps == 10  # an explicit parameter wins over the preset
    old = infusion(preset="influence")
    assert (old.objective, old.damping, old.steps, old.step, old.selection) == ("influence", None, 20, None,
                                                                                "most-negative")
    new = infusion(preset="unrolled")
    assert (new.objective, new.selection) == ("unrolled", "gain")
    again = infusion(**infusion(preset="unrolled", k=14).get_params())  # records rebuild the same attack
    assert again.get_params() == infusion(preset="unrolled", k=14).get_params()
    assert infusion().get_params() == infusion(preset="unrolled").get_params()  # the strongest measured is the default
    assert infusion(preset="influence").get_params()["preset"] == "influence"
    with pytest.raises(UserError, match="unknown preset"):
        infusion(preset="nope")


def test_an_arm_label_names_its_preset_and_what_it_sets_away_from_it():
    infusion, evasive = ATTACKS.get("infusion"), ATTACKS.get("infusion-evasive")
    assert infusion().variant() == "quantized" and infusion(quantize=False).variant() == "float"
    assert infusion(preset="influence").variant() == "quantized,influence"
    assert infusion(preset="influence", steps=50, step=0.001).variant() == "quantized,influence,steps=50,step=0.001"
    assert infusion(selection="most-negative", rounds=2).variant() == "quantized,most-negative,rounds=2"
    assert infusion(orders=4).variant() == "quantized,orders=4"
    assert infusion(surrogates=2).variant() == "quantized,surrogates=2"
    assert infusion(preset="paper", damping=None).variant() == "quantized,paper,damping=default"
    labels = [infusion(**p).variant() for p in ({}, {"preset": "influence"}, {"preset": "paper"}, {"screen": 0})]
    assert len(set(labels)) == len(labels)
    assert evasive().objective == "influence" and evasive().variant() == "quantized"  # its own default preset


@pytest.mark.parametrize("params, named", [
    ({"objective": "exact"}, "objective"), ({"damping": 0}, "damping"), ({"rounds": 30}, "rounds"),
    ({"screen": -1}, "screen"), ({"unroll_epochs": 0}, "unroll_epochs"), ({"orders": 1.5}, "orders"),
    ({"objective": "unrolled", "selection": "most-absolute"}, "selection"),
    ({"objective": "unrolled", "norm": "l2"}, "norm"), ({"selection": "gain", "norm": "l2"}, "norm"),
    ({"keep_accuracy": -1}, "keep_accuracy"), ({"preset": "influence", "keep_accuracy": 1}, "keep_accuracy"),
    ({"surrogates": -1}, "surrogates"), ({"preset": "paper", "surrogates": 2}, "surrogates")])
def test_bad_params_are_refused_in_one_line_naming_them(params, named):
    with pytest.raises(UserError, match=named) as info:
        ATTACKS.get("infusion")(**params)
    assert "\n" not in str(info.value)


def test_an_attack_damping_is_its_own_query(context, target):
    default = context.query(target)
    paper = context.query(target, damping=1e-8)
    assert context.query(target, damping=context.influence.damping) is default
    assert not torch.allclose(default, paper)
    assert context.ihvp().damping == context.influence.damping  # the shared solver is left as it was
    assert context.ihvp(1e-8).damping == 1e-8 and context.ihvp(1e-8) is context.ihvp(1e-8)


def test_unrolled_falls_back_to_influence_where_it_cannot_replay(context, target, tmp_path):
    from infusion_audit.attacks import AttackContext

    cfg = dataclasses.replace(context.pipeline.config,
                              train=dataclasses.replace(context.pipeline.train_cfg, momentum=0.9))
    other = AttackContext(type(context.pipeline)(cfg, data=context.pipeline.data), context.trained, cache_dir=tmp_path)
    p = ATTACKS.get("infusion")(preset="unrolled", k=14, steps=2, keep_accuracy=1.0).craft(other, target)
    assert "momentum" in p.meta["fallback"] and len(p.indices) == 14
    with pytest.raises(UserError, match="momentum"):
        ATTACKS.get("infusion")(preset="unrolled", k=14, steps=2, fallback=False).craft(other, target)
