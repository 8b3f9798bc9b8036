"""Mitigation plugins: clip bounds a document's step, DP-SGD reports ε and replays its noise, partition
aggregation's certified radius holds against an attacker who picks the shards it hits."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn

from infusion_audit.cli import main
from infusion_audit.config import TrainConfig
from infusion_audit.data import digits
from infusion_audit.errors import ConfigError, PluginError, UserError
from infusion_audit.mitigations import DPSGD, Clip, Partition, VoteEnsemble, build_mitigation
from infusion_audit.models import DigitsCNN
from infusion_audit.registry import MITIGATIONS
from infusion_audit.training import Checkpoint, train


@pytest.fixture(scope="module")
def split():
    return digits()


def recipe_fit(**recipe):
    """A `fit` by the built-in loop, as a pipeline's would be."""
    cfg = TrainConfig(**{"optimizer": "sgd", "lr": 0.05, "batch_size": 16, "epochs": 2, "seed": 0, **recipe})
    return functools.partial(train, cfg=cfg, progress=False)


def new_model() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(1, 10)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_builtins_are_registered_and_listed(capsys):
    assert {"clip", "dp-sgd", "partition"} <= set(MITIGATIONS.names())
    assert main(["plugins", "--kind", "mitigations"]) == 0
    out = capsys.readouterr().out
    assert "mitigations (" in out and "partition" in out and "dp-sgd" in out
    assert build_mitigation("dp-sgd", {"noise_multiplier": 2.0}).get_params()["noise_multiplier"] == 2.0


# --------------------------------------------------------------------------- clip and dp-sgd
@pytest.mark.parametrize("recipe", [{"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "adam", "lr": 0.003}],
                         ids=["sgd-momentum", "adam"])
def test_clip_that_never_bites_is_the_plain_loop_and_keeps_the_checkpoint_state(split, recipe):
    """From a checkpoint with momentum / Adam moments: clipping at a norm no gradient reaches takes the plain
    loop's steps (so the optimizer state loaded before wrapping is the one used), and leaves a plain model."""
    data = split.train.subset(np.arange(160))
    fit = recipe_fit(**recipe)
    saved = []
    fit(new_model(), data, until_epoch=1, on_epoch=saved.append)
    start = saved[0]
    plain = fit(new_model(), data, start=start, until_epoch=2)
    mitigated = Clip(max_grad_norm=1e6).retrain(fit, new_model, data, start=start, epochs=1)
    assert mitigated.figures["clipped_fraction"] == 0.0 and mitigated.figures["steps"] == 10
    assert torch.allclose(params(mitigated.model), params(plain), atol=1e-6)
    stateless = fit(new_model(), data, start=Checkpoint(1, start.model, {}), until_epoch=2)
    assert (params(stateless) - params(plain)).abs().max() > 1e-3  # the state matters: losing it would show
    assert not any(m._forward_hooks or m._backward_hooks for m in mitigated.model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in mitigated.model.parameters())


def test_clip_bounds_one_documents_step(split):
    """One SGD step on one batch of B documents: replacing one of them by a wild document (white image,
    wrong label) moves the weights by at most lr * 2 * max_grad_norm / B under clip; plainly, far more."""
    batch = split.train.subset(np.arange(8))
    wild = batch.with_documents([0], np.ones_like(batch.x[:1]), (batch.y[:1] + 5) % 10)
    lr, norm = 0.5, 0.05
    fit = recipe_fit(lr=lr, batch_size=8, epochs=1)
    clip = Clip(max_grad_norm=norm)
    moved = (params(clip.retrain(fit, new_model, wild).model) - params(clip.retrain(fit, new_model, batch).model)).norm()
    bound = lr * 2 * norm / len(batch)
    assert moved <= bound * (1 + 1e-4)
    plain = (params(fit(new_model(), wild)) - params(fit(new_model(), batch))).norm()
    assert plain > 10 * bound


def test_dp_sgd_replays_its_noise_and_reports_epsilon(split):
    data = split.train.subset(np.arange(96))
    fit = recipe_fit(epochs=2)
    first, again = (DPSGD(noise_multiplier=1.0).retrain(fit, new_model, data) for _ in range(2))
    assert torch.equal(params(first.model), params(again.model))  # a poisoned retrain and its control: same draws
    other_seed = DPSGD(noise_multiplier=1.0, noise_seed=1).retrain(fit, new_model, data)
    assert not torch.equal(params(first.model), params(other_seed.model))
    assert first.figures["steps"] == 2 * 6 and "Poisson" in first.figures["sampling"]
    epsilons = [DPSGD(noise_multiplier=s).retrain(fit, new_model, data).figures["epsilon"] for s in (0.7, 1.0, 2.0)]
    assert all(np.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons[0] > epsilons[1] > epsilons[2]
    saved = []
    fit(new_model(), data, until_epoch=1, on_epoch=saved.append)
    assert "without noise" in DPSGD().retrain(fit, new_model, data, start=saved[0], epochs=1).figures["epsilon_covers"]


def test_batchnorm_model_is_refused_by_name(split):
    def bn_model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))

    with pytest.raises(UserError, match="BatchNorm") as info:
        Clip().retrain(recipe_fit(), bn_model, split.train.subset(np.arange(32)))
    assert "\n" not in str(info.value)


def own_loop_fit(model, dataset, start=None, until_epoch=None):
    """A user's training loop that knows nothing of `wrap`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = dataset.batch(np.arange(len(dataset)))
    for _ in range(until_epoch or 2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_mitigations_say_when_they_cannot_wrap_a_users_loop(split):
    data = split.train.subset(np.arange(64))
    for mitigation in (Clip(), DPSGD()):
        with pytest.raises(UserError, match="takes no `wrap` keyword") as info:
            mitigation.retrain(own_loop_fit, new_model, data)
        assert mitigation.name in str(info.value) and "partition" in str(info.value) and "\n" not in str(info.value)

    def ignores_wrap(model, dataset, **kwargs):
        return own_loop_fit(model, dataset)

    with pytest.raises(UserError, match="never called it"):
        Clip().retrain(ignores_wrap, new_model, data)
    ensemble = Partition(parts=2).retrain(own_loop_fit, new_model, data).model  # partition works with any fit
    assert ensemble(split.test.batch(np.arange(5))[0]).shape == (5, 10)


@pytest.mark.parametrize("build", [
    lambda: Clip(max_grad_norm=-1.0), lambda: Clip(max_grad_norm=0), lambda: DPSGD(noise_multiplier=-0.5),
    lambda: DPSGD(noise_multiplier=0.0), lambda: DPSGD(delta=2.0), lambda: Partition(parts=1),
    lambda: Partition(parts=True), lambda: Partition(epochs=0), lambda: build_mitigation("clip", {"max_norm": 1.0}),
], ids=["negative-norm", "zero-norm", "negative-noise", "no-noise", "delta", "one-part", "bool-parts", "zero-epochs",
        "unknown-param"])
def test_bad_params_are_one_line_config_errors(build):
    with pytest.raises(ConfigError) as info:
        build()
    assert "\n" not in str(info.value) and "mitigation" in str(info.value)


def test_more_parts_than_documents_and_unknown_names_are_refused(split):
    with pytest.raises(ConfigError, match="at most the 5 training documents"):
        Partition(parts=6).retrain(recipe_fit(), new_model, split.train.subset(np.arange(5)))
    with pytest.raises(PluginError, match="unknown mitigation"):
        build_mitigation("no-such-mitigation")


# --------------------------------------------------------------------------- partition
class Fixed(nn.Module):
    """A member that always outputs the same class scores."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def one_hot_scores(c: int, margin: float = 4.0) -> list[float]:
    return [margin if i == c else 0.0 for i in range(3)]


@pytest.mark.parametrize("votes, vote, edit, insert_remove", [
    ([0, 1], 0, 0, 0),                 # a tie goes to the lower class, which a single change undoes
    ([2, 2, 2, 2, 0], 2, 0, 1),        # 4 v 1 (class 0 would win a tie): gap 2
    ([1] * 9, 1, 2, 4),                # unanimous: gap 9 - 1 = 8
    ([2] * 8, 2, 1, 3),                # unanimous for the last class: the rivals' tie-break +1 costs a vote
])
def test_vote_scores_and_radius_follow_dpa(votes, vote, edit, insert_remove):
    ensemble = VoteEnsemble([Fixed(one_hot_scores(c)) for c in votes])
    x = torch.zeros(1, 1)
    scores = ensemble(x)
    assert int(scores.argmax()) == vote and torch.isfinite(scores).all()
    shares = torch.bincount(torch.tensor(votes), minlength=3) / len(votes)
    assert (torch.softmax(scores, -1)[0] - shares).abs().max() < 0.5 / len(votes)
    assert int(ensemble.certified_radius(x, "edit")[0]) == edit
    assert int(ensemble.certified_radius(x, "insert-remove")[0]) == insert_remove
    with pytest.raises(UserError, match="'edit' or 'insert-remove'"):
        ensemble.certified_radius(x, "delete")


def test_tie_goes_to_the_lower_class_whatever_the_members_confidence():
    ensemble = VoteEnsemble([Fixed([0.1, 0.0, 0.0]), Fixed([0.0, 9.0, 0.0])])  # class 1's voter is far surer
    assert int(ensemble(torch.zeros(1, 1)).argmax()) == 0


def landing_variants(x: np.ndarray, label: int, template, partition: Partition):
    """Variants of `x` (one pixel nudged on the 1/16 grid) labelled `label`, each with the shard it lands in:
    an attacker who tries contents until a poison lands in the shard it wants."""
    flat = x.reshape(-1)
    for j in range(100_000):
        v = flat.copy()
        v[j % v.size] = (v[j % v.size] + (1 + j // v.size) / 16) % 1.0
        v = v.reshape(x.shape)
        doc = dataclasses.replace(template, x=v[None], y=np.array([label]))
        yield v, int(partition.shards(doc)[0])


def poison(data, partition: Partition, x: np.ndarray, label: int, plan: list[tuple[int, int]]):
    """Replace document `i` by a variant of (x, label) that lands in shard `s`, for each (i, s) of `plan`."""
    variants = landing_variants(x, label, data.subset([0]), partition)
    edits = []
    for i, shard in plan:
        edits.append(next(v for v, s in variants if s == shard))
    index = [i for i, _ in plan]
    return data.with_documents(index, np.stack(edits), np.full(len(index), label))


def test_certified_radius_holds_against_edits_within_it_and_not_far_beyond(split):
    """Partition into 8 shards of ~60 digits. For test inputs with certified edit radius r >= 1: r edits
    that each take a document out of one shard and put a probe copy (the input, labelled with the runner-up)
    into another (2r shards hit, all voting for the prediction) never change the vote, members on untouched
    shards are bit-identical, and at most 2r members change; 6 probe copies in every shard (48 edits) flip it."""
    data = split.train.subset(np.arange(480))
    partition, fit = Partition(parts=8), recipe_fit(optimizer="adam", lr=0.01, epochs=8)
    clean = partition.retrain(fit, new_model, data).model
    x_test = split.test.batch(np.arange(40))[0]
    radius = clean.certified_radius(x_test, "edit")
    chosen = [int(i) for i in np.flatnonzero(radius.numpy() >= 1)[:3]]
    assert len(chosen) == 3
    shard = partition.shards(data)
    flips = 0
    for i in chosen:
        x = x_test[i:i + 1]
        votes, _ = clean.tally(x)
        vote, r = int(votes[0].argmax()), int(radius[i])
        runner_up = int(torch.where(torch.arange(10) == vote, -1, votes[0]).argmax())
        member_votes = [int(m(x).argmax()) for m in clean.members]
        hit = [j for j in range(8) if member_votes[j] == vote][:2 * r]  # 2r shards that vote for the prediction
        assert len(hit) == 2 * r
        plan = [(int(np.flatnonzero(shard == out)[0]), into) for out, into in zip(hit[:r], hit[r:])]
        within = partition.retrain(fit, new_model, poison(data, partition, x[0].numpy(), runner_up, plan)).model
        assert int(within(x).argmax()) == vote
        changed = [j for j in range(8) if not torch.equal(params(within.members[j]), params(clean.members[j]))]
        assert set(changed) <= set(hit)
        assert sum(int(m(x).argmax()) != v for m, v in zip(within.members, member_votes)) <= 2 * r

        many = [(int(doc), j) for j in range(8) for doc in np.flatnonzero(shard == j)[:6]]
        beyond = partition.retrain(fit, new_model, poison(data, partition, x[0].numpy(), runner_up, many)).model
        flips += int(beyond(x).argmax()) != vote
    assert flips >= 1
