"""The results layer: typed, versioned records that round-trip through their JSON line; schema-1 records read
under this schema; a record lacking what the readers need refused in one line; and one summariser whose figures
the attack table, `BenchResult.summaries` and the report all show. Hand-made records, no training."""

from __future__ import annotations

import json
import re

import pytest

from infusion_audit.bench import BenchResult
from infusion_audit.errors import DataError
from infusion_audit.io import append_jsonl_many
from infusion_audit.reports import render_report
from infusion_audit.results import (SCHEMA, AttackRecord, DefenceRecord, DetectionRecord, MitigationRecord, Record,
                                    SkipRecord, by_kind, format_table, load_records, summarise)
from infusion_audit.results.summary import ci_text
from infusion_audit.statistics import mean_ci, paired_test

BUDGET = {"k": 4, "eps": 0.25, "norm": "linf", "quantize": True}
WHERE = {"cell": "c0", "dataset": "digits", "attack": "infusion", "variant": "quantized", "budget": BUDGET,
         "target": {"index": 0, "true": 1, "class": 7}, "seed": 0, "victim": "digits-cnn"}
FIGURES = ({"p": 0.01, "logodds": -4.0, "top1": False, "logprob": -6.0, "greedy": 0.0},
           {"p": 0.02, "logodds": -3.5, "top1": False, "logprob": -5.5, "greedy": 0.0},
           {"p": 0.6, "logodds": 0.5, "top1": True, "logprob": -0.5, "greedy": 0.75})


def test_effect_records_are_built_from_the_behaviours_figures():
    record = AttackRecord.from_figures(*FIGURES, **WHERE, acc_control=0.95, acc_poisoned=0.94)
    assert record.delta_p == pytest.approx(0.58) and record.delta_logodds == pytest.approx(4.0)
    assert record.flip is True and record.p_before == 0.01
    assert record.extra == {"greedy_before": 0.0, "greedy_control": 0.0, "greedy_poisoned": 0.75,
                            "logprob_before": -6.0, "logprob_control": -5.5, "logprob_poisoned": -0.5}
    line = record.to_dict()
    assert line["kind"] == "attack" and line["schema"] == SCHEMA == 2 and line["logprob_poisoned"] == -0.5
    assert "scenario" not in line and line["dataset"] == "digits"
    assert "artefact" not in line and "repeat" not in line  # a field left None is not written
    mitigated = MitigationRecord.from_figures(*FIGURES, **WHERE, mitigation="clip", acc_unmitigated=0.96,
                                              figures={"clipped_fraction": 0.5})
    assert mitigated.to_dict()["kind"] == "mitigation" and mitigated.delta_logodds == record.delta_logodds
    skip = SkipRecord(**record.shared_fields(), detector="token-diff", reason="needs a reference")
    assert skip.shared_fields() == WHERE and skip.to_dict()["cell"] == "c0"


@pytest.mark.parametrize("record", [
    AttackRecord.from_figures(*FIGURES, **WHERE, params={"steps": 10}, timings={"craft": 1.0},
                              norms={"linf": 0.25}, poisoned_indices=[3, 5], artefact="artefacts/poisoned/c0"),
    MitigationRecord.from_figures(*FIGURES, **WHERE, mitigation="partition", mitigation_params={"parts": 5},
                                  acc_unmitigated=0.95, figures={"certified_radius_edit": 2}),
    DetectionRecord(**WHERE, detector="spectral", knowledge="model", seconds=0.5,
                    auroc={"value": 0.9, "lo": 0.8, "hi": 1.0, "n": 100}, roc={"fpr": [0, 1], "tpr": [0, 1]},
                    flag_precision=None, auroc_unedited={"value": 0.5, "lo": None, "hi": None, "n": 100}),
    DefenceRecord(**WHERE, detector="spectral", delta_p_after=0.01, acc_after=0.93, acc_control=0.95,
                  delta_logodds_after=0.2, removed=10, removed_poisons=3),
    SkipRecord(**WHERE, detector="token-diff", reason="needs a reference", extra={"note": "by hand"}),
], ids=lambda r: r.kind)
def test_every_kind_round_trips_through_its_json_line(record):
    line = json.loads(json.dumps(record.to_dict()))
    assert Record.from_dict(line) == record
    assert type(record).from_dict(line) == record
    assert None not in line.values()


def test_a_schema_1_record_reads_scenario_as_dataset():
    line = {"kind": "attack", "scenario": "caesar", "attack": "infusion-text", "budget": {"k": 4}, "delta_p": 0.1,
            "delta_logodds": 1.0, "logprob_control": -3.0}
    record = Record.from_dict(line)
    assert isinstance(record, AttackRecord) and record.dataset == "caesar" and "scenario" not in record.extra
    assert record.extra == {"logprob_control": -3.0}
    assert record.to_dict() == {"kind": "attack", "schema": 2, "dataset": "caesar", "attack": "infusion-text",
                                "budget": {"k": 4}, "delta_p": 0.1, "delta_logodds": 1.0, "logprob_control": -3.0}
    # under schema 2, `scenario` is no name of the schema: kept as it was, not renamed
    assert Record.from_dict({**line, "schema": 2}).extra["scenario"] == "caesar"


def test_records_the_readers_cannot_use_are_refused_in_one_line(tmp_path, caplog):
    good = AttackRecord(**WHERE, delta_p=0.1, delta_logodds=1.0).to_dict()
    lines = [good, {"kind": "telemetry"}, {k: v for k, v in DefenceRecord(
        **WHERE, detector="spectral", delta_p_after=0.0, acc_after=0.9, acc_control=0.95).to_dict().items()
        if k != "acc_after"}]
    append_jsonl_many(tmp_path / "results.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_records(tmp_path)
    message = str(info.value)
    assert message == f"{tmp_path / 'results.jsonl'}: record 3 (defence) lacks acc_after" and "\n" not in message
    assert "record 2 has unknown kind 'telemetry'" in caplog.text  # an unknown kind is skipped, not fatal
    with pytest.raises(DataError, match=r"^here \(attack\): delta_logodds must be a number$"):
        Record.from_dict({**good, "delta_logodds": "large"}, "here")
    with pytest.raises(DataError, match=r"schema 3; this version of infusion-audit reads 1 to 2"):
        Record.from_dict({**good, "schema": 3})
    with pytest.raises(DataError, match=r"kind 'attack', expected detection"):
        DetectionRecord.from_dict(good)
    with pytest.raises(ValueError, match="named fields"):
        AttackRecord(**WHERE, delta_p=0.1, delta_logodds=1.0, extra={"delta_p": 0.2})


def _attack(attack: str, variant: str, target: int, delta_logodds: float, delta_p: float, **fields) -> AttackRecord:
    return AttackRecord(**{**WHERE, "cell": f"{attack}-{variant}-{target}-{fields.get('repeat', 0)}",
                           "target": {"index": target, "true": 1, "class": 7}, "attack": attack, "variant": variant},
                        delta_logodds=delta_logodds, delta_p=delta_p, acc_control=0.95, acc_poisoned=0.94, **fields)


# Infusion: every Δp tiny but Δ log-odds clearly above 0; random noise: Δp > 0 on every target, but its
# Δ log-odds CI straddles 0; label flip: one target only; probe insertion x k: the topline.
EFFECTS = {("infusion", "quantized"): ([4.4, 4.6, 4.8], [1e-11, 2e-11, 3e-11]),
           ("random-noise", "quantized"): ([3.0, -1.0, 0.5], [0.01, 0.02, 0.03]),
           ("label-flip", ""): ([2.0], [0.1]),
           ("probe-insertion", "xk"): ([8.0, 9.0, 10.0], [0.4, 0.5, 0.6])}


@pytest.fixture
def run(tmp_path):
    records = [_attack(attack, variant, t, lo, p) for (attack, variant), (los, ps) in EFFECTS.items()
               for t, (lo, p) in enumerate(zip(los, ps))]
    append_jsonl_many(tmp_path / "results.jsonl", [r.to_dict() for r in records])
    return tmp_path, records


def test_the_success_rule_decides_on_the_log_odds_interval(run):
    _, records = run
    rows = {row["label"]: row for row in summarise(by_kind(records))["attacks"]}
    infusion, noise, flip = rows["infusion (quantized)"], rows["random-noise (quantized)"], rows["label-flip"]
    assert infusion["status"] == "succeeds" and infusion["delta_p"]["mean"] == pytest.approx(2e-11)
    assert noise["status"] == "no effect shown" and noise["success_p"]["rate"] == 1.0
    assert noise["success"]["k"] == 2 and noise["delta_logodds"]["lo"] < 0 < noise["delta_logodds"]["hi"]
    assert flip["status"] == "too few targets"


def test_the_table_the_report_and_the_bench_result_show_the_same_figures(run):
    run_dir, records = run
    summary = summarise(by_kind(records))
    assert summarise(load_records(run_dir))["attacks"] == summary["attacks"]  # written and read back: the same
    assert [row["delta_logodds"] for row in BenchResult(run_dir).summaries["attacks"]] == \
        [row["delta_logodds"] for row in summary["attacks"]]
    table = format_table(summary).splitlines()
    html = render_report(run_dir).read_text(encoding="utf-8")
    figures = html[html.index('id="figures"'):html.index("<h3>Detectors</h3>")]
    for (attack, variant), (effects, deltas) in EFFECTS.items():
        label = f"{attack} ({variant})" if variant else attack
        expected = mean_ci(effects)
        (row,) = [r for r in summary["attacks"] if r["label"] == label]
        assert row["delta_logodds"] == expected and row["n"] == len(effects)
        (line,) = [line for line in table if line.startswith(label + "  ")]
        assert f"  {ci_text(expected, 3, False)}  " in line and f"  {ci_text(mean_ci(deltas), 4, False)}  " in line
        row_html = re.search(rf"<tr><td>{re.escape(label)}</td>(?:(?!</tr>).)*", figures, re.S).group(0)
        assert f'<td class="num">{ci_text(expected, 2, False)}</td>' in row_html
        assert row["status"] in line


def test_reference_arms_are_paired_on_their_cells_and_set_against_the_topline(run):
    _, records = run
    summary = summarise(by_kind(records))
    versus = {c["versus"]: c for c in summary["comparisons"]}
    assert set(versus) == {"random-noise (quantized)", "probe-insertion (xk)"}  # label-flip: one shared cell
    noise = versus["random-noise (quantized)"]
    assert noise["arm"] == "infusion (quantized)" and noise["budget"] == "k=4, L∞ ε=0.25"
    assert noise == {**noise, **paired_test([4.4, 4.6, 4.8], [3.0, -1.0, 0.5])} and noise["wins"] == 3
    share = versus["probe-insertion (xk)"]["share_of_topline"]
    assert share["delta_logodds"] == pytest.approx(4.6 / 9.0) and share["delta_p"] == pytest.approx(2e-11 / 0.5)
    assert "share of the topline: 0.000 in Δp, 0.511 in Δ log-odds" in format_table(summary)


def test_an_arms_repeats_pair_by_their_mean_on_each_cell():
    infusion = [_attack("infusion-text", "gcg", t, v, 0.0) for t, v in enumerate([5.0, 1.0, 4.0])]
    random = [_attack("random-tokens", "", t, v, 0.0, repeat=j)
              for t, values in enumerate([[2.0, 4.0, 6.0], [0.0, 3.0, 3.0], [1.0, 1.0, 1.0]])
              for j, v in enumerate(values)]
    summary = summarise(by_kind(infusion + random))
    (paired,) = summary["comparisons"]
    assert paired["n"] == 3 and paired["wins"] == 2  # 5 vs 4, 1 vs 2, 4 vs 1
    assert paired["diff"]["mean"] == pytest.approx(((5 - 4) + (1 - 2) + (4 - 1)) / 3)
    assert [row["n"] for row in summary["attacks"]] == [3, 9]  # every repeat's record counts in its arm
    assert summary["cells"] == 12 and summary["targets"] == 3 and summary["counts"]["attack"] == 12


def test_a_run_of_several_datasets_names_each_arms_dataset():
    records = [_attack("infusion", "quantized", 0, 1.0, 0.1),
               AttackRecord(**{**WHERE, "dataset": "cifar10"}, delta_p=0.1, delta_logodds=1.0)]
    labels = [row["label"] for row in summarise(by_kind(records))["attacks"]]
    assert labels == ["cifar10: infusion (quantized)", "digits: infusion (quantized)"]
