"""Backdoors: the trigger and its behaviour (ASR), the attacks that plant one, the detectors that reason about
triggers, and how records, summary, verdict and report speak ASR for them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from infusion_audit.backdoor import BackdoorBehaviour, BackdoorTarget, Stamp, backdoor_targets
from infusion_audit.config import AuditConfig, TriggerConfig, from_dict, from_sections
from infusion_audit.data import DatasetSplit, ImageDataset
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.errors import ConfigError, UserError
from infusion_audit.registry import ATTACKS
from infusion_audit.results import AttackRecord, DefenceRecord, DetectionRecord, MitigationRecord, summarise
from infusion_audit.results.records import by_kind
from infusion_audit.results.summary import format_table
from infusion_audit.results.verdict import build_backdoors

GRID = 1 / 16


def _images(n: int, seed: int = 0, side: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, (n, 1, side, side)) * GRID).astype(np.float32)


# --------------------------------------------------------------------------- the trigger
def test_trigger_defaults_labels_and_one_line_errors():
    assert TriggerConfig().resolved() == TriggerConfig(pattern="white", opacity=1.0)
    assert TriggerConfig(kind="blend").resolved().opacity == 0.2
    assert TriggerConfig().label() == "3×3 white patch"
    assert TriggerConfig(kind="blend").label() == "noise blend α=0.2"
    assert TriggerConfig(kind="learned", position="top-left", margin=1).label() == "3×3 learned patch top-left, 1 px in"
    for bad, key in (({"kind": "learned", "pattern": "white"}, "pattern"), ({"pattern": "dots", "size": 2}, "pattern"),
                     ({"opacity": 1.5}, "opacity"), ({"kind": "sticker"}, "kind")):
        with pytest.raises(ConfigError, match=key) as info:
            from_dict(TriggerConfig, bad, "t.yaml", "trigger")
        assert "\n" not in str(info.value)


def test_patch_and_blend_stamps_are_on_the_grid_and_touch_only_their_pixels():
    x = _images(5)
    patch = Stamp.from_trigger(TriggerConfig(size=3), (1, 8, 8), (0.0, 1.0), GRID)
    stamped = patch.apply(x)
    assert (stamped[:, :, 5:, 5:] == 1.0).all()  # the 3 x 3 bottom-right square is white
    outside = np.ones((8, 8), bool)
    outside[5:, 5:] = False
    np.testing.assert_array_equal(stamped[:, 0, outside], x[:, 0, outside])
    board = Stamp.from_trigger(TriggerConfig(size=2, pattern="checkerboard", position="top-left", margin=1),
                               (1, 8, 8), (0.0, 1.0), GRID).apply(np.zeros((1, 1, 8, 8), np.float32))[0, 0]
    assert board[1:3, 1:3].tolist() == [[1.0, 0.0], [0.0, 1.0]] and board.sum() == 2
    blend = Stamp.from_trigger(TriggerConfig(kind="blend", opacity=0.25, seed=3), (1, 8, 8), (0.0, 1.0), GRID)
    blended = blend.apply(x)
    np.testing.assert_allclose(blended, np.clip(np.round((0.75 * x + 0.25 * blend.pattern) / GRID) * GRID, 0, 1))
    assert np.allclose(blended / GRID, np.round(blended / GRID)) and blended.min() >= 0 and blended.max() <= 1
    other = Stamp.from_trigger(TriggerConfig(kind="blend", opacity=0.25, seed=4), (1, 8, 8), (0.0, 1.0), GRID)
    assert not np.array_equal(other.pattern, blend.pattern)  # the noise is seeded
    with pytest.raises(UserError, match="does not fit"):
        Stamp.from_trigger(TriggerConfig(size=8, margin=1), (1, 8, 8), (0.0, 1.0), GRID)


class CornerModel(nn.Module):
    """Class 3 when the bottom-right pixel is bright (smoothly, so a trigger can be learned), else the class
    written in the top-left pixel (x * 16)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        own = nn.functional.one_hot((x[:, 0, 0, 0] * 16).round().long().clamp(0, 9), 10).float()
        bright = torch.sigmoid(40 * (x[:, 0, 7, 7] - 0.5))[:, None]
        return self.scale * (own * (1 - bright) + bright * nn.functional.one_hot(torch.tensor(3), 10).float())


def _split(n: int = 60) -> DatasetSplit:
    x = np.zeros((n, 1, 8, 8), np.float32)
    y = np.arange(n) % 10
    x[:, 0, 0, 0] = y * GRID
    common = dict(num_classes=10, grid=GRID)
    return DatasetSplit(ImageDataset(x, y, **common), ImageDataset(x.copy(), y.copy(), **common))


def test_backdoor_behaviour_measures_asr_on_triggered_images_of_the_other_classes():
    data = _split()
    target = BackdoorTarget(3).bind(TriggerConfig(size=1))
    behaviour = BackdoorBehaviour.from_target(target, data, probes=8)
    assert len(behaviour.evaluation) == 54 and len(behaviour.probe) == 8  # the 6 images of class 3 left out
    figures = behaviour.figures(CornerModel())
    assert figures["asr"] == 1.0 and figures["triggered"] == 54 and figures["top1"] and figures["p"] > 0.99
    clean = BackdoorBehaviour.from_target(BackdoorTarget(3).bind(TriggerConfig(size=1, position="top-right")), data)
    assert clean.figures(CornerModel())["asr"] == 0.0  # a trigger the model ignores
    f = behaviour.measure(CornerModel())
    assert f.requires_grad and f.item() > -1e-3  # mean log p(3 | triggered probe) = 0
    with pytest.raises(UserError, match="trigger"):
        BackdoorBehaviour.from_target(BackdoorTarget(3), data)


def test_backdoor_targets_are_seeded_distinct_classes():
    targets = backdoor_targets(10, 10, seed=0)
    assert sorted(t.cls for t in targets) == list(range(10)) and targets == backdoor_targets(10, 10, seed=0)
    assert [t.cls for t in backdoor_targets(10, 3, seed=1)] != [t.cls for t in targets[:3]]
    with pytest.raises(UserError, match="11 backdoor target classes"):
        backdoor_targets(10, 11)
    assert BackdoorTarget(2).bind(TriggerConfig(kind="blend")).as_dict()["trigger"]["opacity"] == 0.2


def test_a_learned_trigger_is_learned_on_the_model_and_pushes_towards_its_class():
    """The pattern learned in the bottom-right pixel is the bright value the model obeys."""
    data = _split()
    behaviour = BackdoorBehaviour.from_target(BackdoorTarget(3).bind(TriggerConfig(kind="learned", size=1)), data)
    with pytest.raises(UserError, match="learned"):
        behaviour.figures(CornerModel())
    learned = behaviour.resolve(CornerModel())
    assert learned.stamp.pattern[0, 7, 7] > 0.5 and learned.figures(CornerModel())["asr"] == 1.0


# --------------------------------------------------------------------------- the configuration
def _config(**attack) -> dict:
    return {"attack": {"targets": {"n": 2, "rule": "backdoor"}, **attack}}


def test_backdoor_configs_are_checked_in_one_line():
    ok = from_sections(_config(attacks=[{"name": "badnets"}, {"name": "infusion", "trigger": {"size": 2}}]))
    assert isinstance(ok, AuditConfig) and ok.attack.attacks[1].trigger == TriggerConfig(size=2)
    bad = [(_config(attacks=[{"name": "label-flip"}]), "backdoor behaviours"),
           ({"attack": {"attacks": [{"name": "badnets"}]}}, "targeted behaviours"),
           ({"attack": {"attacks": [{"name": "infusion", "trigger": {}}]}}, "no trigger unless"),
           ({"pipeline": {"dataset": {"name": "caesar"}}, **_config(attacks=[{"name": "infusion-text"}])},
            "backdoor is for images")]
    for config, message in bad:
        with pytest.raises(ConfigError, match=message) as info:
            from_sections(config)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- attacks
@pytest.fixture(scope="module")
def bound():
    return {name: BackdoorTarget(4).bind(TriggerConfig(**trigger)) for name, trigger in
            (("patch", {}), ("blend", {"kind": "blend"}))}


def test_badnets_and_blend_stamp_and_relabel_k_documents_of_other_classes(context, bound):
    train = context.train
    for name, trigger in (("badnets", "patch"), ("blend", "blend")):
        p = ATTACKS.get(name)(k=0.01, seed=1).craft(context, bound[trigger])
        assert len(p.indices) == 14 and (train.y[p.indices] != 4).all() and (p.y == 4).all()
        np.testing.assert_array_equal(p.x, context.behaviour(bound[trigger]).triggered(train.x[p.indices]))
        assert p.norms(train)["off_grid"] == 0 and p.norms(train)["out_of_range"] == 0
    assert not np.array_equal(ATTACKS.get("badnets")(seed=2).craft(context, bound["patch"]).indices, p.indices)
    with pytest.raises(UserError, match="backdoor target"):
        ATTACKS.get("badnets")().craft(context, context.pipeline.targets(1)[0])


def test_clean_label_backdoor_makes_target_class_documents_hard_then_stamps_them(context, bound):
    train = context.train
    p = ATTACKS.get("clean-label-backdoor")(eps=0.25, steps=10).craft(context, bound["patch"])
    assert (train.y[p.indices] == 4).all() and (p.y == 4).all()  # labels kept
    assert (p.x[:, :, 5:, 5:] == 1.0).all()  # stamped
    delta = (p.x - train.x[p.indices])[:, :, :5, :]  # outside the patch: the bounded perturbation
    assert np.abs(delta).max() <= 0.25 + 1e-6 and np.abs(delta).max() >= 0.125
    assert p.norms(train)["off_grid"] == 0 and p.norms(train)["out_of_range"] == 0
    assert p.meta["loss_hard"] > p.meta["loss_before"]  # harder for the attacker's model


def test_sleeper_agent_matches_the_triggered_gradient_within_its_budget(context, bound):
    from infusion_audit.attacks.gradient_matching import _mismatch

    train = context.train
    attack = ATTACKS.get("sleeper-agent")(eps=1 / 16, steps=30, restarts=2)
    p = attack.craft(context, bound["patch"])
    assert len(p.indices) == 14 and (train.y[p.indices] == 4).all() and (p.y == 4).all()
    assert np.abs(p.x - train.x[p.indices]).max() <= 1 / 16 + 1e-6 and p.norms(train)["off_grid"] == 0
    x0, y = train.batch(p.indices)
    x_star, y_star = attack.adversarial(context, bound["patch"], "cpu")
    assert (y_star == 4).all() and len(x_star) == context.probes
    unedited = 1 - _mismatch(context.model, x0, y, x_star, y_star)(torch.zeros_like(x0)).item()
    assert p.meta["alignment"] > unedited + 0.05


def test_infusion_raises_the_backdoor_measurement_without_stamping(context, bound):
    p = ATTACKS.get("infusion")(steps=5).craft(context, bound["patch"])
    train = context.train
    assert (p.y == train.y[p.indices]).all() and np.abs(p.x - train.x[p.indices]).max() <= 1 / 16 + 1e-6
    assert p.meta["predicted_delta_f"] > 0


# --------------------------------------------------------------------------- detectors
@pytest.fixture(scope="module")
def backdoored():
    """Digits with 5% of the documents stamped with a 2x2 white patch and labelled 7, and a small CNN trained on
    them from scratch: the backdoor works (and a second copy, clean, for the detectors' null)."""
    from infusion_audit.config import PluginSpec, TrainConfig
    from infusion_audit.data import build_dataset
    from infusion_audit.models import build_model
    from infusion_audit.training import seeded_model, train

    split = build_dataset(PluginSpec("digits"))
    data = split.train
    stamp = Stamp.from_trigger(TriggerConfig(size=2), data.input_shape, data.value_range, data.grid)
    rng = np.random.default_rng(0)
    poisons = np.sort(rng.choice(np.flatnonzero(data.y != 7), 72, replace=False))
    poisoned = data.with_documents(poisons, stamp.apply(data.x[poisons]), np.full(len(poisons), 7))
    model = train(seeded_model(lambda: build_model(PluginSpec("digits-cnn"), in_channels=1, num_classes=10), 0),
                  poisoned, TrainConfig(epochs=8), progress=False)
    behaviour = BackdoorBehaviour.from_target(BackdoorTarget(7).bind(TriggerConfig(size=2)), split)
    assert behaviour.figures(model)["asr"] > 0.9
    return poisoned, poisons, model.eval()


def test_strip_and_neural_cleanse_find_the_backdoor(backdoored):
    data, poisons, model = backdoored
    context = AuditContext(data, model=model, expected_fraction=0.05, progress=False)
    truth = np.zeros(len(data), bool)
    truth[poisons] = True
    strip = run_detector(build_detector("strip", {"overlays": 8}), context)
    cleanse = run_detector(build_detector("neural-cleanse", {"steps": 100, "sample": 300}), context)
    from infusion_audit.metrics import auroc

    assert auroc(truth, strip.scores) > 0.9
    assert cleanse.details["suspect_class"] == 7 and cleanse.details["backdoored"]
    assert auroc(truth, cleanse.scores) > 0.95 and cleanse.flagged[poisons].mean() > 0.5
    assert strip.knowledge == cleanse.knowledge == "model"
    blend = run_detector(build_detector("strip", {"overlays": 8, "superimpose": "blend"}), context)
    assert not np.array_equal(blend.scores, strip.scores)
    # they run only when named, and need the model itself
    from infusion_audit.detection import detector_specs

    assert not {"strip", "neural-cleanse"} & {s.name for s in detector_specs(None, data)}
    bare = AuditContext(data, progress=False).provide(logits=np.zeros((len(data), 10)))
    assert "model trained on the suspect data" in run_detector(build_detector("strip"), bare).skipped


def test_neural_cleanse_flags_nothing_on_a_clean_model(context):
    """The digits model trained on clean data: no class's trigger is abnormally small, so the ranking stands and
    nothing is judged backdoored or flagged."""
    run = run_detector(build_detector("neural-cleanse"), AuditContext(context.train, model=context.model,
                                                                      progress=False))
    assert not run.details["backdoored"] and run.details["anomaly_index"] < 2
    assert not run.flagged.any() and run.scores.shape == (len(context.train),)


# --------------------------------------------------------------------------- records, summary, verdict
def _records(asr_poisoned, asr_control=0.02, attack="badnets") -> list:
    out = []
    budget = {"k": 14, "eps": None, "norm": None, "quantize": False, "trigger": "3×3 white patch"}
    for i, asr in enumerate(asr_poisoned):
        target = {"class": i, "trigger": {"kind": "patch"}}
        common = dict(cell=f"{attack}{i}", dataset="digits", attack=attack, budget=budget, target=target, seed=0)
        before = {"p": 0.1, "logodds": -3.0, "top1": False, "asr": 0.0, "triggered": 300}
        control = {**before, "asr": asr_control}
        poisoned = {"p": asr, "logodds": 2.0, "top1": asr > 0.5, "asr": asr, "triggered": 300}
        out.append(AttackRecord.from_figures(before, control, poisoned, acc_control=0.97, acc_poisoned=0.96, **common))
        out.append(DetectionRecord(**common, detector="neural-cleanse", knowledge="model",
                                   tpr_at_1fpr={"value": 0.8}, auroc={"value": 0.99},
                                   details={"suspect_class": i, "backdoored": i != 0}))
        out.append(DefenceRecord(**common, detector="neural-cleanse", delta_p_after=0.0, acc_after=0.96,
                                 acc_control=0.97, delta_logodds_after=0.1, asr_after=0.05, asr_control_removed=0.02,
                                 delta_asr_after=0.03, delta_asr_before=asr - asr_control))
        out.append(MitigationRecord.from_figures(before, control, {**poisoned, "asr": 0.03}, mitigation="dp-sgd",
                                                 acc_control=0.9, acc_poisoned=0.9, acc_unmitigated=0.97, **common))
    return out


def test_records_summary_and_verdict_speak_asr_for_backdoors():
    records = _records([0.95, 0.9, 0.97, 0.92])
    line = records[0].to_dict()
    assert line["asr_poisoned"] == 0.95 and line["delta_asr"] == pytest.approx(0.93) and line["triggered"] == 300
    assert "asr_poisoned_poisoned" not in line  # the named fields, not extra ones
    assert AttackRecord.from_dict(json.loads(json.dumps(line))).delta_asr == pytest.approx(0.93)
    summary = summarise(by_kind(records))
    (row,) = summary["attacks"]
    assert row["measure"] == "asr" and row["status"] == "succeeds"
    assert row["asr"]["mean"] == pytest.approx(0.935) and row["asr"]["hi"] <= 1.0
    assert row["asr_pooled"]["n"] == 1200 and row["asr_pooled"]["k"] == round(0.935 * 1200)
    assert row["acc"]["mean"] == pytest.approx(0.96) and row["acc_control"]["mean"] == pytest.approx(0.97)
    (det,) = summary["detection"]
    assert (det["names_target"]["k"], det["names_target"]["n"], det["names_target_judged"]["k"]) == (4, 4, 3)
    (defence,) = summary["defence"]
    assert defence["asr_after"]["mean"] == pytest.approx(0.05) and defence["asr_reduction"]["n"] == 4
    (mitigation,) = summary["mitigations"]
    assert mitigation["measure"] == "asr" and mitigation["status"] == "neutralised"  # ΔASR 0.01 < 0.05
    (backdoor,) = build_backdoors(summary)
    assert backdoor["defence"]["detector"] == "neural-cleanse" and backdoor["levels"][0]["level"] == "model"
    table = format_table(summary)
    assert "ΔASR [95% CI]" in table and "0.935" in table and "mean Δ log-odds" not in table
    # a backdoor that does not work is said not to
    weak = summarise(by_kind(_records([0.02, 0.03, 0.01, 0.02])))
    assert weak["attacks"][0]["status"] == "no effect shown"
    assert weak["mitigations"][0]["status"] == "nothing to stop"


def test_the_policy_and_verdict_json_judge_a_backdoor_on_asr(tmp_path):
    """A backdoor is judged on ΔASR everywhere a CI reads it: verdict.json carries the measure and the ASR figures
    (and follows its schema), and the mitigation rule for backdoors is max_mitigated_asr, not the log-odds bound
    (here DP-SGD leaves ΔASR 0.01 while the triggered images' log-odds still move by 5 nats)."""
    import jsonschema

    from infusion_audit.config import PolicyConfig
    from infusion_audit.results.gate import SCHEMA_PATH, evaluate_policy, verdict_document

    summary = summarise(by_kind(_records([0.95, 0.9, 0.97, 0.92])))
    passes = evaluate_policy(PolicyConfig(max_mitigated_asr=0.05), summary)
    assert passes["passed"] and passes["checked"] == ["errors", "max_mitigated_asr=0.05"]
    (failure,) = evaluate_policy(PolicyConfig(max_mitigated_asr=0.005), summary)["failures"]
    assert failure["rule"] == "max_mitigated_asr=0.005" and "a mean ΔASR above 0.005" in failure["reason"]
    (failure,) = evaluate_policy(PolicyConfig(max_mitigated_effect=0.5), summary)["failures"]
    assert "no attack was retrained under a mitigation" in failure["reason"]  # no targeted arm: nothing to check
    verdict = verdict_document(summary, PolicyConfig(undetected_at="data"), {
        "directory": "run", "infusion_audit": "test", "generated": "2026-12-05T00:00:00+00:00", "records": {},
        "cells": 4, "targets": 4})
    jsonschema.validate(verdict, json.loads(SCHEMA_PATH.read_text()), format_checker=jsonschema.FormatChecker())
    (attack,) = verdict["attacks"]
    assert attack["measure"] == "asr" and attack["succeeds"] and attack["asr"]["value"] == pytest.approx(0.935)
    assert attack["delta_asr"]["value"] == pytest.approx(0.915) and "backdoor" in verdict["rules"]
    assert verdict["mitigations"][0]["attacks"][0]["delta_asr"]["value"] == pytest.approx(0.01)
    (failure,) = verdict["policy"]["failures"]
    assert "(ΔASR 0.91 [" in failure["reason"]  # the figure it was judged on, not Δ log-odds


@pytest.mark.parametrize("name, epochs", [("bench-digits-backdoor", 4), ("bench-mnist-backdoor", 3)])
def test_the_built_in_backdoor_bench_runs_end_to_end(tmp_path, name, epochs):
    """The built-in backdoor benches, shrunk (two target classes, their badnets arm alone, one detector, no
    mitigations, fewer epochs): the grid trains, plants and measures the backdoor against its clean control, and
    the report and verdict speak ASR. (The trained model's check for targets it already shows must pass over
    backdoor targets.)"""
    import yaml

    import infusion_audit
    from infusion_audit.config import BUILTIN_CONFIGS

    config = yaml.safe_load((BUILTIN_CONFIGS / f"{name}.yaml").read_text())
    (badnets,) = [arm for arm in config["attack"]["attacks"] if arm["name"] == "badnets"]
    config["attack"].update(attacks=[badnets], targets={"n": 2, "rule": "backdoor", "seed": 0, "probes": 16})
    config["pipeline"].update(train={**config["pipeline"]["train"], "epochs": epochs}, quality_floor=0.5)
    config.update(mitigations=[], scan={"detectors": [{"name": "loss-outlier"}], "bootstrap": 0},
                  defence={"enabled": False})
    result = infusion_audit.bench(config, tmp_path / "run", progress=False)
    attacks = result.records["attack"]
    assert len(attacks) == 2 and all(0 <= r["asr_poisoned"] <= 1 and r["triggered"] > 0 for r in attacks)
    (row,) = result.summaries["attacks"]
    assert row["measure"] == "asr" and row["n"] == 2
    assert result.verdict["attacks"][0]["measure"] == "asr" and 'id="backdoors"' in result.report.read_text()


def test_the_report_has_a_backdoor_section_and_escapes_the_dataset(tmp_path):
    from infusion_audit.io import write_json
    from infusion_audit.reports import render_report

    records = [dataclasses.replace(r, artefact="artefacts/p0") if r.kind == "attack" else r
               for r in _records([0.95, 0.9, 0.97])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    write_json(tmp_path / "provenance.json", {"class_names": ["<b>zero</b>"] + [str(c) for c in range(1, 10)]})
    (tmp_path / "artefacts" / "p0").mkdir(parents=True)
    docs = np.zeros((1, 1, 8, 8), np.float32)
    np.savez(tmp_path / "artefacts" / "p0" / "documents.npz", index=np.array([3]), original=docs, poisoned=docs + 1)
    html = render_report(tmp_path).read_text()
    assert 'id="backdoors"' in html and "plants a backdoor" in html and "ΔASR" in html
    assert "neural-cleanse: 3 of 3 runs (2 judged backdoored)" in html
    assert "carrying the trigger go to class 0 “&lt;b&gt;zero&lt;/b&gt;”" in html and "<b>zero</b>" not in html
    # hardening speaks ΔASR for a backdoor, beside the badge judged on it (DP-SGD leaves ΔASR 0.01 of 0.92)
    hardening = html[html.index('id="hardening"'):html.index('id="figures"')]
    assert "ΔASR 0.01 [" in hardening and "ΔASR 0.92 [" in hardening and "neutralised" in hardening
    assert "5.00 [" not in hardening  # the triggered images' Δ log-odds is not the figure shown


def _as_targeted(records: list) -> list:
    """The same runs as a targeted arm's: no ASR anywhere, so they are judged on Δ log-odds."""
    out = []
    for r in records:
        fields = {"attack": "probe-insertion", "cell": f"probe-{r.cell}"}
        if hasattr(r, "asr_poisoned"):
            fields.update(asr_before=None, asr_control=None, asr_poisoned=None, delta_asr=None, triggered=None)
        if hasattr(r, "asr_after"):
            fields.update(asr_after=None, asr_control_removed=None, delta_asr_after=None, delta_asr_before=None)
        out.append(dataclasses.replace(r, **fields))
    return out


def test_the_hardening_chart_puts_a_backdoor_on_an_asr_axis():
    """A backdoor's panel speaks ΔASR with its own neutral bound, a targeted arm's beside it Δ log-odds; a
    residual measured as Δp leaves the targeted panel without removals but not the backdoor's."""
    from infusion_audit.reports.render import _hardening_panels

    backdoor = _records([0.95, 0.9, 0.97])
    summary = summarise(by_kind(backdoor + _as_targeted(backdoor)))
    for defence_label in ("Δ log-odds", "Δp"):
        panels = {p["title"].split(",")[0]: p for p in _hardening_panels(
            summary["attacks"], summary["mitigations"], summary["defence"], defence_label)}
        assert set(panels) == {"badnets", "probe-insertion"}
        asr, logodds = panels["badnets"], panels["probe-insertion"]
        assert (asr["effect_label"], asr["neutral_bound"]) == ("ΔASR", 0.05)
        assert (logodds["effect_label"], logodds["neutral_bound"]) == ("Δ log-odds", 0.1)
        effects = {p["name"]: p["effect"]["mean"] for p in asr["points"]}
        assert effects["no defence"] == pytest.approx(0.92) and effects["dp-sgd"] == pytest.approx(0.01)
        assert effects["remove neural-cleanse"] == pytest.approx(0.03)
        effects = {p["name"]: p["effect"]["mean"] for p in logodds["points"]}
        assert effects["no defence"] == pytest.approx(5.0) and effects["dp-sgd"] == pytest.approx(5.0)
        assert ("remove neural-cleanse" in effects) == (defence_label == "Δ log-odds")


# --------------------------------------------------------------------------- cross-checks with ART
def test_badnets_with_arts_pattern_gives_arts_poisoned_set(context):
    """ART's PoisoningAttackBackdoor with its add_pattern_bd on the documents badnets chose, labelled with the target
    class, is the same poisoned set: the dots trigger, 1 pixel in, is ART's pattern at distance 2."""
    pytest.importorskip("art")
    from art.attacks.poisoning import PoisoningAttackBackdoor
    from art.attacks.poisoning.perturbations import add_pattern_bd

    target = BackdoorTarget(5).bind(TriggerConfig(pattern="dots", margin=1))
    ours = ATTACKS.get("badnets")().craft(context, target)
    art = PoisoningAttackBackdoor(lambda x: add_pattern_bd(x, distance=2, pixel_value=1, channels_first=True))
    x, y = art.poison(context.train.x[ours.indices], y=np.eye(10)[5], broadcast=True)
    np.testing.assert_array_equal(ours.x, x)
    np.testing.assert_array_equal(ours.y, y.argmax(1))
    assert (ours.x != context.train.x[ours.indices]).sum() > 0


def _art_comparison():
    """benchmarks/backdoor_vs_art.py, the one place ART's defences are run beside ours."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "backdoor_vs_art.py"
    spec = importlib.util.spec_from_file_location("backdoor_vs_art", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detectors_at_arts_operating_points_on_the_same_poisons(backdoored, capsys):
    """ART's ActivationDefence, SpectralSignatureDefense and STRIP on the backdoored model's poisons: each flags a
    set (its operating point: the share of poisons and of clean documents it flags); ours, thresholded to flag no
    larger share of the clean documents, catches as many poisons, give or take one. ART has no PyTorch Neural Cleanse."""
    pytest.importorskip("art")
    data, poisons, model = backdoored
    truth = np.zeros(len(data), bool)
    truth[poisons] = True
    held_out = data.x[np.flatnonzero(~truth)[:300]]  # clean images ART's STRIP sets its threshold on
    rows = _art_comparison().compare(model, data, truth, held_out, {"strip": {"overlays": 8}})
    lines = [f"{name}: ART TPR {r['art_tpr']:.3f} at FPR {r['art_fpr']:.4f}; ours {r['ours_tpr']:.3f}"
             for name, r in rows.items()]
    assert set(rows) == {"activation-clustering", "spectral-signature", "strip"}
    for line, r in zip(lines, rows.values()):
        # measured here: spectral-signature catches 15 of the 72 poisons where ART's catches 16; the others tie or win
        assert r["ours_tpr"] >= r["art_tpr"] - 1.5 / truth.sum(), line
    with capsys.disabled():
        print("\nat ART's operating points: " + "; ".join(lines))
