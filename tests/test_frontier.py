"""The adaptive attacker in the bench and the report: the unedited null beside every detection figure of
an in-place edit, the frontier (success against detection as stealth grows, one panel per detector), and
the verdict grouped by what the defender has, on a small real bench, checked in headless Chromium."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from test_browser import Elements, load_in_chromium

from infusion_audit import bench
from infusion_audit.config import load_config
from infusion_audit.registry import ATTACKS
from infusion_audit.results import AttackRecord
from infusion_audit.results.verdict import build_defender_levels, headline_level, stealth_key

ADAPTIVE_BENCH = """
pipeline:
  dataset: {name: digits}
attack:
  attacks:
    - {name: infusion, params: {preset: influence, steps: 5}}
    - {name: infusion-evasive, params: {steps: 5, evade: [loss-outlier], evade_quantile: 0.5}}
    - {name: infusion-evasive, params: {steps: 5, evade: [loss-outlier], evade_quantile: 0.9}}
    - {name: label-flip}
  targets: {n: 2, seed: 0}
budgets:
  - {k: 0.01, eps: 0.0625}
scan:
  detectors: [{name: loss-outlier}, {name: knn-label}, {name: perturbation-norm},
              {name: influence-outlier, params: {mode: forensic}}]
  bootstrap: 0
defence: {enabled: false}
"""


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    """The one real bench with detector-aware arms (about two minutes on 2 cores: the forensic detector fits
    influence factors on every poisoned model)."""
    root = tmp_path_factory.mktemp("adaptive-bench")
    (root / "bench.yaml").write_text(ADAPTIVE_BENCH)
    result = bench(root / "bench.yaml", root / "run", progress=False)
    return result, result.report.read_text(encoding="utf-8")


def test_evasive_variants_tell_stealth_settings_apart():
    build = ATTACKS.get("infusion-evasive")
    variants = [build(evade=["loss-outlier"], evade_quantile=q, stealth=lam).variant()
                for q, lam in [(0.9, 0), (0.5, 0), (0.9, 1), (0.9, 10)]] + [build(stealth=1).variant()]
    assert len(set(variants)) == len(variants)
    assert variants[2] == "quantized,evade=loss-outlier@0.9,λ=1" and variants[4] == "quantized,λ=1@0.9"


def test_builtin_benches_hold_the_adaptive_arms():
    default = {spec.name for spec in load_config("bench-digits").attack.attacks}
    assert {"infusion-evasive", "gradient-matching", "infusion", "probe-insertion"} <= default
    sweep = load_config("bench-digits-adaptive")
    evasive = [spec.params for spec in sweep.attack.attacks if spec.name == "infusion-evasive"]
    assert {p.get("evade_quantile") for p in evasive} == {0.9, 0.75, 0.5}
    assert {p.get("stealth", 0) for p in evasive} == {0, 1, 10}
    assert len({tuple(p.get("evade", ())) for p in evasive}) >= 3  # none, loss-outlier alone, several at once
    names = [(spec.name, spec.params.get("copies")) for spec in sweep.attack.attacks]
    assert {("infusion", None), ("gradient-matching", None), ("probe-insertion", 1), ("probe-insertion", None)} \
        <= set(names)
    assert sweep.attack.targets.n == 30
    variants = [ATTACKS.get("infusion-evasive")(**p).variant() for p in evasive]
    assert len(set(variants)) == len(variants)  # each setting is its own arm in the report


def test_stealth_order():
    def arm(**params) -> dict:
        return {"records": [AttackRecord(attack="infusion-evasive", budget={}, delta_p=0.0, delta_logodds=0.0,
                                         params=params)]}

    plain = arm(evade_quantile=None)
    ordered = [plain, arm(stealth=1.0, evade_quantile=0.9), arm(evade=["a"], evade_quantile=0.9),
               arm(evade=["a"], evade_quantile=0.5), arm(evade=["a"], evade_quantile=0.5, stealth=10.0),
               arm(evade=["a", "b"], evade_quantile=0.9)]
    assert sorted(reversed(ordered), key=stealth_key) == ordered


def test_headline_never_needs_a_reference_or_the_behaviour():
    levels = [{"level": "model", "best": "loss-outlier", "naive_tpr": 0.4},
              {"level": "reference", "best": "perturbation-norm", "naive_tpr": 1.0},
              {"level": "forensic", "best": "influence-outlier", "naive_tpr": 1.0}]
    assert headline_level(levels)["best"] == "loss-outlier"
    assert headline_level(levels[1:]) is None


def test_a_catch_that_the_adaptive_attacker_evades_is_called_so():
    def attack(name: str, variant: str, status: str = "succeeds") -> dict:
        return {"arm": ("digits", name, variant), "budget_key": (14,), "status": status, "label": name + variant,
                "delta_logodds": {"mean": 1.0}}

    def detection(a: dict, detector: str, knowledge: str, tpr: float) -> dict:
        return {"arm": a["arm"], "budget_key": a["budget_key"], "detector": detector, "knowledge": knowledge,
                "metrics": {"tpr_at_1fpr": {"mean": tpr}}}

    naive, evasive = attack("infusion", ""), attack("infusion-evasive", "q")
    weak = attack("infusion-evasive", "w", "no effect shown")
    rows = [detection(naive, "loss-outlier", "model", 0.97), detection(evasive, "loss-outlier", "model", 0.05),
            detection(weak, "loss-outlier", "model", 0.0), detection(naive, "knn-label", "model", 0.4),
            detection(evasive, "knn-label", "model", 0.9), detection(naive, "influence-outlier", "forensic", 1.0),
            detection(evasive, "influence-outlier", "forensic", 0.96)]
    model, forensic = build_defender_levels([naive, evasive, weak], rows)
    assert (model["level"], model["best"], model["naive_tpr"]) == ("model", "loss-outlier", 0.97)
    # the worst case counts only adaptive arms that still succeed (not `weak`)
    assert model["worst"]["metrics"]["tpr_at_1fpr"]["mean"] == 0.05 and model["survives"] is False
    assert (forensic["best"], forensic["survives"]) == ("influence-outlier", True)
    assert not model["all_attacks"]


@pytest.mark.slow
def test_in_place_edits_carry_the_unedited_null(adaptive_run):
    result, _ = adaptive_run
    detection = result.records["detection"]
    edited = [r for r in detection if r["attack"] != "label-flip"]
    assert edited and all(0 <= r["tpr_at_1fpr_unedited"]["value"] <= 1 and "auroc_unedited" in r for r in edited)
    assert all(r["unedited_model"] == "clean control" for r in edited)
    # a relabelled document has no unedited counterpart
    assert not any("auroc_unedited" in r for r in detection if r["attack"] == "label-flip")
    # the reference detector sees nothing in unedited documents (they equal the reference): the edit is all it finds
    pn = [r for r in edited if r["detector"] == "perturbation-norm"]
    assert all(r["auroc_unedited"]["value"] == pytest.approx(0.5) and r["auroc"]["value"] > 0.9 for r in pn)


@pytest.mark.slow
@pytest.mark.browser
def test_report_shows_the_frontier_and_the_grouped_verdict(adaptive_run, tmp_path):
    result, html = adaptive_run
    assert 'id="frontier"' in html and 'id="defender"' in html
    frontier = html[html.index('id="frontier"'):html.index('id="roc"')]
    assert frontier.count("<svg") == 1
    # arms numbered by stealth: plain Infusion first, then the evasion quantile falling
    labels = re.findall(r'<td class="num">(\d+)</td><td>([^<]+)</td>', frontier)
    assert [n for n, _ in labels] == ["1", "2", "3"]
    assert "infusion (" in labels[0][1] and "@0.9" in labels[1][1] and "@0.5" in labels[2][1]
    verdict = html[html.index('id="defender"'):html.index('id="detection"')]
    for level in ("a model trained on the data", "a trusted reference copy", "the suspicious behaviour"):
        assert level in verdict
    headline = re.search(r"your best detector is ([\w-]+)", verdict).group(1)
    assert headline in ("loss-outlier", "knn-label")  # never one that needs the reference copy or the behaviour
    for best in re.findall(r"<td><strong>([^<]+)</strong></td>", verdict):
        assert best in ("loss-outlier", "knn-label", "perturbation-norm", "influence-outlier(mode=forensic)")
    assert "unedited" in html[html.index("<h3>Detectors</h3>"):]

    loaded = load_in_chromium(result.report, tmp_path)
    assert loaded["requests"] == []
    dom = Elements()
    dom.feed(loaded["dom"])
    assert {"verdict", "defender", "detection", "frontier"} <= dom.ids and "script" not in dom.tags
    shot = Image.open(loaded["screenshot"]).convert("L")
    assert len(shot.crop((0, 0, 1280, 1200)).getcolors(1 << 16) or []) > 20  # rendered text, not a blank page
