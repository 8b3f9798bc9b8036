"""The gate a team's CI applies to a bench, on hand-made records (no training): the verdict at a glance by
what the defender has (a detector needing a trusted reference copy is never counted for a defender without
one), each attack beside its own random-edit control, the policy's rules and their one-line reasons,
verdict.json against its JSON Schema, and the JUnit file as a JUnit reader sees it."""

from __future__ import annotations

import json

import jsonschema
import pytest
from junitparser import Error, Failure, JUnitXml, Skipped

from infusion_audit.config import PolicyConfig
from infusion_audit.io import append_jsonl_many
from infusion_audit.reports.junit import write_junit
from infusion_audit.results import (AttackRecord, DetectionRecord, ErrorRecord, MitigationRecord, by_kind, load_records,
                                    summarise)
from infusion_audit.results.gate import SCHEMA_PATH, evaluate_policy, glance, write_verdict

BOUNDED = {"k": 14, "eps": 0.0625, "norm": "linf", "quantize": True}
RELABEL = {"k": 14, "eps": None, "norm": None, "quantize": False}
# attack -> (variant, budget, params, Δ log-odds per target, flipped targets, TPR at 1% FPR per detector)
ARMS = {
    "infusion": ("quantized", BOUNDED, {"selection": "most-negative"}, [1.0, 1.5, 1.2, 0.9], [],
                 {"loss-outlier": 0.8, "perturbation-norm": 1.0, "influence-outlier": 0.95}),
    "random-noise": ("quantized", BOUNDED, {"selection": "most-negative"}, [0.1, -0.05, 0.2, 0.0], [],
                     {"loss-outlier": 0.01, "perturbation-norm": 1.0, "influence-outlier": 0.0}),
    "label-flip": ("", RELABEL, {"selection": "most-negative"}, [3.0, 2.5, 3.5, 2.8], [2],
                   {"loss-outlier": 0.6, "perturbation-norm": 1.0, "influence-outlier": 0.7}),
    "gradient-matching": ("", BOUNDED, {}, [0.5, 0.7, 0.6, 0.4], [],
                          {"loss-outlier": 0.05, "perturbation-norm": 1.0, "influence-outlier": 0.2}),
}
KNOWLEDGE = {"loss-outlier": "model", "perturbation-norm": "reference", "influence-outlier": "forensic"}


def records(errors: bool = True, mitigated: list[float] | None = None) -> list:
    out = []
    for attack, (variant, budget, params, deltas, flips, tprs) in ARMS.items():
        for t, delta in enumerate(deltas):
            where = {"cell": f"{attack}-{t}", "dataset": "digits", "attack": attack, "variant": variant,
                     "budget": budget, "target": {"index": t, "true": 0, "class": 1}, "seed": 0}
            if attack == "infusion" and t == 0:  # an earlier run's error, superseded by the attack record below
                out.append(ErrorRecord(**where, stage="attack", error="RuntimeError", message="out of memory"))
            out.append(AttackRecord(**where, params=params, delta_logodds=delta, delta_p=delta / 1000,
                                    flip=t in flips, top1_poisoned=t in flips))
            for detector, tpr in tprs.items():
                out.append(DetectionRecord(**where, detector=detector, knowledge=KNOWLEDGE[detector],
                                           tpr_at_1fpr={"value": tpr, "lo": None, "hi": None, "n": 14}))
            if attack == "infusion" and mitigated is not None:
                out.append(MitigationRecord(**where, mitigation="clip", delta_logodds=mitigated[t]))
    if errors:
        out.append(ErrorRecord(cell="label-flip-3", dataset="digits", attack="label-flip", budget=RELABEL,
                               target={"index": 3, "true": 0, "class": 1}, seed=0, stage="detector",
                               detector="spectral-signature", error="ValueError", message="boom in one cell"))
    return out


def run_dir(tmp_path, **kwargs):
    append_jsonl_many(tmp_path / "results.jsonl", [r.to_dict() for r in records(**kwargs)])
    return tmp_path


@pytest.fixture
def summary(tmp_path):
    return summarise(load_records(run_dir(tmp_path)))


def test_each_level_counts_only_what_that_defender_has(summary):
    table = glance(summary)
    levels = {lv["level"]: lv for lv in table["levels"]}
    assert list(levels) == ["model", "reference", "forensic"]
    assert levels["model"]["detectors"] == ["loss-outlier"]
    # a defender with the suspicious behaviour has no reference copy: perturbation-norm (1.0 everywhere) is not his
    assert levels["forensic"]["detectors"] == ["influence-outlier", "loss-outlier"]
    assert levels["forensic"]["best"]["detector"] == "influence-outlier"
    assert levels["forensic"]["best"]["mean_tpr"] == pytest.approx((0.95 + 0.7 + 0.2) / 3)  # the succeeding attacks
    assert levels["reference"]["best"]["detector"] == "perturbation-norm"
    assert levels["model"]["evading"] == ["gradient-matching"] and levels["reference"]["evading"] == []
    assert set(levels["model"]["caught"]) == {"infusion (quantized)", "label-flip"}
    rows = {r["label"]: r for r in table["rows"]}
    gm = rows["gradient-matching"]["cells"]
    assert gm["model"]["outcome"] == "evades" and gm["model"]["best"]["detector"] == "loss-outlier"
    assert [d["detector"] for d in gm["reference"]["caught_by"]] == ["perturbation-norm"]
    assert [(c["level"], c["detector"]) for c in rows["infusion (quantized)"]["least"]] == [("model", "loss-outlier")]
    assert [(c["level"], c["detector"]) for c in rows["gradient-matching"]["least"]] == [
        ("reference", "perturbation-norm")]
    assert (table["attacks"], table["succeeding"], table["controls"]) == (3, 3, 1)
    assert table["rows"][-1]["label"] == "random-noise (quantized)"  # the control comes last


def test_an_attack_is_paired_with_its_own_random_edit_control(summary):
    rows = {a["label"]: a for a in summary["attacks"]}
    control = rows["infusion (quantized)"]["control"]
    assert control["label"] == "random-noise (quantized)" and (control["wins"], control["n"]) == (4, 4)
    assert control["diff"]["mean"] == pytest.approx((0.9 + 1.55 + 1.0 + 0.9) / 4)
    assert rows["random-noise (quantized)"]["is_control"] and rows["label-flip"]["control"] is None
    assert rows["gradient-matching"]["control"] is None  # its own documents: random noise is not its control


def test_errors_that_stand(summary):
    assert [(e["stage"], e["detector"], e["message"]) for e in summary["errors"]] == [
        ("detector", "spectral-signature", "boom in one cell")]  # the attack error was superseded


@pytest.mark.parametrize("policy, failed", [
    (PolicyConfig(undetected_at="reference", allow_errors=True), []),
    (PolicyConfig(undetected_at="model", allow_errors=True), ["undetected_at=model"]),
    (PolicyConfig(undetected_at="forensic", allow_errors=True), ["undetected_at=forensic"]),
    (PolicyConfig(undetected_at="model", attacks=["infusion", "label-flip"], allow_errors=True), []),
    (PolicyConfig(), ["errors"]),
    (PolicyConfig(max_mitigated_effect=0.5, allow_errors=True), ["max_mitigated_effect=0.5"]),
])
def test_policy_rules(summary, policy, failed):
    outcome = evaluate_policy(policy, summary)
    assert [f["rule"] for f in outcome["failures"]] == failed and outcome["passed"] is (not failed)
    assert all("\n" not in f["reason"] for f in outcome["failures"])


def test_policy_reasons_name_what_failed_them(summary, tmp_path):
    reasons = {f["rule"]: f["reason"] for f in evaluate_policy(PolicyConfig(undetected_at="forensic"),
                                                                 summary)["failures"]}
    assert reasons["undetected_at=forensic"].startswith(
        "1 attack succeeds and no detector available with a model and the suspicious behaviour (no reference copy) "
        "catches it: gradient-matching, k=14, L∞ ε=0.0625 (Δ log-odds 0.55 [")
    assert "best influence-outlier, TPR at 1% FPR 0.20" in reasons["undetected_at=forensic"]
    assert reasons["errors"] == ("1 plugin error in this run: label-flip, k=14, target #3, spectral-signature raised "
                                 "ValueError: boom in one cell")
    mitigated = summarise(load_records(run_dir(tmp_path / "m", errors=False, mitigated=[0.05, 0.04, 0.06, 0.05])))
    assert evaluate_policy(PolicyConfig(max_mitigated_effect=0.1), mitigated)["passed"]
    over = evaluate_policy(PolicyConfig(max_mitigated_effect=0.01), mitigated)["failures"][0]["reason"]
    assert over.startswith("1 attack keeps a mean Δ log-odds above 0.01 under a mitigation: infusion (quantized), "
                           "k=14, L∞ ε=0.0625 under clip: 0.05 [")


def test_verdict_json_follows_its_schema_and_junit_reads_back(tmp_path):
    directory = run_dir(tmp_path, mitigated=[0.05, 0.04, 0.06, 0.05])
    (directory / "config.yaml").write_text("policy: {undetected_at: model, max_mitigated_effect: 0.1}\n")
    path, verdict = write_verdict(directory)
    assert json.loads(path.read_text()) == verdict
    jsonschema.validate(verdict, json.loads(SCHEMA_PATH.read_text()), format_checker=jsonschema.FormatChecker())
    assert [f["rule"] for f in verdict["policy"]["failures"]] == ["errors", "undetected_at=model"]
    assert verdict["policy"]["checked"] == ["errors", "undetected_at=model", "max_mitigated_effect=0.1"]
    infusion = next(a for a in verdict["attacks"] if a["attack"] == "infusion")
    assert infusion["succeeds"] and infusion["versus_control"]["control"] == "random-noise (quantized)"
    assert verdict["mitigations"][0]["attacks"][0]["neutralised"] is True
    broken = dict(verdict, attacks=[dict(infusion, succeeds="yes")])
    with pytest.raises(jsonschema.ValidationError):  # the schema can fail
        jsonschema.validate(broken, json.loads(SCHEMA_PATH.read_text()))

    xml = JUnitXml.fromfile(str(write_junit(verdict, tmp_path / "junit.xml")))
    suites = {suite.name: suite for suite in xml}
    model = suites["attacks against a defender with a model trained on the data"]
    assert model.tests == 3 and model.failures == 1  # attacks x level; the random-edit control is no attack
    cases = {case.name: case for case in model}
    failure = cases["gradient-matching, k=14, L∞ ε=0.0625"].result[0]
    assert isinstance(failure, Failure) and "best loss-outlier, TPR at 1% FPR 0.05" in failure.message
    assert cases["label-flip, k=14"].is_passed
    assert isinstance(next(iter(suites["plugin errors"])).result[0], Error)
    policy = {case.name: case for case in suites["policy"]}
    assert not policy["max_mitigated_effect=0.1"].result and isinstance(policy["errors"].result[0], Failure)
    assert sum(suite.tests for suite in xml) == 3 * 3 + 1 + 3
    assert not any(isinstance(r, Skipped) for suite in xml for case in suite for r in case.result)


@pytest.mark.parametrize("item, message", [
    ("nope=1", "--fail-on: nope=1: expected KEY=VALUE with KEY one of undetected_at, max_mitigated_effect, "
               "max_mitigated_asr, attacks, allow_errors, e.g. undetected_at=model"),
    ("undetected_at", "--fail-on: undetected_at: expected KEY=VALUE"),
    ("undetected_at=everything", "--fail-on: policy.undetected_at: expected one of 'data', 'model', 'probe', "
                                 "'reference', 'forensic', got 'everything'"),
    ("attacks=[nope]", "--fail-on: policy.attacks[0]: expected a known attack"),
])
def test_a_bad_fail_on_is_one_line_before_any_work(tmp_path, capsys, item, message):
    from infusion_audit.cli import main

    assert main(["bench", "--fail-on", item, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and not (tmp_path / "run").exists()


def test_random_token_edits_are_the_control_not_an_attack():
    """The Caesar report's complaint: random token edits counted as a succeeding attack (Δ log-odds 9.25, no
    prediction flipped). They are Infusion's control: shown beside it, paired, and not judged."""
    text = {"k": 40, "eps": None, "norm": None, "quantize": False, "tokens": 2}
    arms = {"infusion-text": ([23.0, 25.1, 21.7], {}), "random-tokens": ([9.0, 9.5, 9.25], {"like": "infusion-text"}),
            "probe-insertion-text": ([39.0, 41.2, 38.6], {})}
    rows = [AttackRecord(cell=f"{attack}-{t}", dataset="caesar", attack=attack, budget=text, domain="text",
                         target={"shift": t, "target_shift": t + 1}, seed=0, params=params, delta_logodds=delta,
                         delta_p=1e-12, flip=attack == "probe-insertion-text", top1_poisoned=False)
            for attack, (deltas, params) in arms.items() for t, delta in enumerate(deltas)]
    summary = summarise(by_kind(rows))
    table = glance(summary)
    assert (table["attacks"], table["succeeding"], table["controls"]) == (2, 2, 1)
    infusion = next(r["attack"] for r in table["rows"] if r["arm"][1] == "infusion-text")
    assert infusion["control"]["label"] == "random-tokens" and infusion["control"]["wins"] == 3
    assert infusion["flip"]["k"] == 0 and next(r["attack"] for r in table["rows"]
                                               if r["arm"][1] == "probe-insertion-text")["flip"]["k"] == 3
    assert evaluate_policy(PolicyConfig(undetected_at="model"), summary, table)["failures"][0]["reason"].startswith(
        "2 attacks succeed and no detector available with a model trained on the data catches them: "
        "probe-insertion-text, k=40, ≤2 tokens per document")
