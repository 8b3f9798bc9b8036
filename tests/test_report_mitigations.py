"""The report's "Hardening the pipeline": per mitigation and attack, the effect under the mitigation paired with
the plain effect of the same runs, its clean-accuracy and time cost and its own figures; the verdict's sentence
per mitigation; absent without mitigation records; hostile labels escaped; the section in a real browser.

The records are hand-made (no training), so every figure below is computed by hand from them."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from test_browser import Elements, load_in_chromium

from infusion_audit.io import append_jsonl
from infusion_audit.reports import render_report
from infusion_audit.results import load_records, summarise
from infusion_audit.results.verdict import mitigation_status
from infusion_audit.statistics import mean_ci

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SEEDS = [0, 0, 1, 1]  # two clean controls per mitigation: runs 0-1 share seed 0's, runs 2-3 seed 1's
ATTACKS = {  # attack -> (variant, budget, plain Δ log-odds per run)
    "infusion": ("quantized", {"k": 3, "eps": 0.25, "norm": "linf", "quantize": True}, [2.0, 2.4, 1.6, 2.0]),
    "label-flip": ("", {"k": 3, "eps": None, "norm": None, "quantize": False}, [0.1, -0.1, 0.2, -0.2]),
}
# mitigation -> Δ log-odds of infusion under it per run, clean control accuracy per seed, retrain seconds, figures
MITIGATIONS = {
    "clip": ([0.02, -0.02, 0.04, 0.0], {0: 0.94, 1: 0.93}, 2.0, lambda i: {"clipped_fraction": 0.5}),
    "dp-sgd": ([1.0, 1.2, 0.8, 1.0], {0: 0.90, 1: 0.90}, 4.0,
               lambda i: {"epsilon": [1.5, 1.5, 2.5, 2.5][i], "delta": 1e-5, "sampling": "poisson",
                          "epsilon_covers": "the retrained epoch", "clipped_fraction": 0.8}),
    "partition": ([0.5, -0.4, 0.3, -0.2], {0: 0.92, 1: 0.92}, 1.5,
                  lambda i: {"parts": 5, "votes": [1, 4], "vote": 1, "certified_radius_edit": [2, 3, 4, 1][i],
                             "certified_radius_insert_remove": 1}),
}
ACC_UNMITIGATED = {0: 0.95, 1: 0.95}


def write_run(run_dir, mitigations=MITIGATIONS, defence=True, attacks=ATTACKS):
    """results.jsonl with 2 attacks x 4 runs, each retrained under every mitigation, and one detector's removal."""
    path = run_dir / "results.jsonl"
    for attack, (variant, budget, plain) in attacks.items():
        for i, effect in enumerate(plain):
            seed = SEEDS[i]
            common = {"cell": f"{attack}-{i}", "scenario": "digits", "domain": "image", "attack": attack,
                      "variant": variant, "budget": budget, "target": {"index": i, "true": 1, "class": 7},
                      "seed": seed, "victim": "mlp"}
            append_jsonl(path, {"kind": "attack", **common, "delta_logodds": effect, "delta_p": effect / 100,
                                "p_control": 0.01, "flip": False, "acc_control": ACC_UNMITIGATED[seed],
                                "acc_poisoned": 0.95, "timings": {"craft": 1.0, "retrain": 1.0}})
            if defence and attack == "infusion":
                append_jsonl(path, {"kind": "defence", **common, "detector": "spectral", "removed": 10,
                                    "removed_poisons": 2, "delta_p_after": 0.0, "delta_logodds_before": effect,
                                    "delta_logodds_after": effect / 2, "acc_control": 0.95, "acc_after": 0.93,
                                    "acc_control_removed": 0.945})
            for name, (under, acc_control, seconds, figures) in mitigations.items():
                delta = under[i] if attack == "infusion" else effect / 10
                radius = {"certified_radius_edit": 5} if attack == "label-flip" and name == "partition" else {}
                append_jsonl(path, {
                    "kind": "mitigation", **common, "mitigation": name, "mitigation_params": {"x": 1},
                    "p_control": 0.01, "p_poisoned": 0.02, "delta_p": delta / 100, "logodds_control": -4.6,
                    "logodds_poisoned": -4.6 + delta, "delta_logodds": delta, "top1_control": False,
                    "top1_poisoned": i == 1 and name == "partition", "flip": i == 1 and name == "partition",
                    "acc_control": acc_control[seed], "acc_poisoned": acc_control[seed] - 0.01,
                    "acc_unmitigated": ACC_UNMITIGATED[seed], "figures": {**figures(i), **radius},
                    "timings": {"retrain": seconds * (1 + seed), "control": seconds,
                                "retrain_unmitigated": 1.0 + seed}})
    return run_dir


def _rows(run_dir):
    rows = summarise(load_records(run_dir))["mitigations"]
    return {(r["mitigation"], r["arm"][1]): r for r in rows}


def test_summary_figures_are_computed_from_the_records(tmp_path):
    rows = _rows(write_run(tmp_path))
    assert len(rows) == 3 * 2 and all(r["n"] == 4 for r in rows.values())
    clip, dp, part = rows["clip", "infusion"], rows["dp-sgd", "infusion"], rows["partition", "infusion"]
    assert clip["delta_logodds"]["mean"] == pytest.approx(0.01)
    assert dp["delta_logodds"]["mean"] == pytest.approx(1.0) and part["delta_logodds"]["mean"] == pytest.approx(0.05)
    assert clip["unmitigated"]["mean"] == pytest.approx(2.0) and clip["unmitigated"]["n"] == 4  # paired by cell
    assert dp["reduction"]["diff"]["mean"] == pytest.approx(1.0) and dp["reduction"]["wins"] == 4
    # the verdict rule: clip's CI is below 0.1, dp-sgd's above 0, partition's straddles both
    assert (clip["status"], dp["status"], part["status"]) == ("neutralised", "still succeeds", "inconclusive")
    assert clip["delta_logodds"]["hi"] < 0.1 < part["delta_logodds"]["hi"] and part["delta_logodds"]["lo"] < 0
    assert rows["clip", "label-flip"]["status"] == "nothing to stop"  # no plain effect to neutralise
    assert mitigation_status(mean_ci([2.0]), mean_ci([0.0, 0.01])) == "too few targets"  # one plain run: unknown
    # clean-accuracy cost over the 2 distinct controls (seed 0: 0.95 - 0.94, seed 1: 0.95 - 0.93), not 4 runs
    assert clip["acc_cost"]["mean"] == pytest.approx(0.015) and clip["acc_cost"]["n"] == 2
    assert dp["acc_cost"]["mean"] == pytest.approx(0.05) and dp["acc_cost"]["sd"] == pytest.approx(0)
    assert clip["time_factor"]["mean"] == pytest.approx(2.0) and dp["time_factor"]["mean"] == pytest.approx(4.0)
    assert dp["epsilon"]["mean"] == pytest.approx(2.0) and dp["delta"] == [1e-5]
    assert dp["epsilon_covers"] == ["the retrained epoch"] and clip["clipped_fraction"]["mean"] == 0.5
    assert part["radius"]["mean"] == pytest.approx(2.5) and part["parts"] == [5]
    assert (part["certified"]["k"], part["certified"]["n"]) == (2, 4)  # k=3 within radii 3 and 4, not 2 and 1
    assert part["flip"]["k"] == 1 and clip["flip"]["k"] == 0
    assert clip["epsilon"]["n"] == 0 and clip["radius"]["n"] == 0  # figures a mitigation lacks stay empty


def _verdict(html: str) -> str:
    return html[html.index('id="verdict"'):html.index('id="detection"')]


def test_section_and_verdict_sentences(tmp_path):
    html = render_report(write_run(tmp_path)).read_text(encoding="utf-8")
    verdict = re.sub(r"\s+", " ", _verdict(html))
    clip, dp, part = (re.search(rf"Trained under <strong>{name}</strong>.*?</li>", verdict).group(0)
                      for name in ("clip", "dp-sgd", "partition"))
    assert "<strong>neutralises infusion (quantized)</strong>" in clip
    assert "1.50 [" in clip and "points of clean accuracy</strong> (2 clean controls)" in clip
    assert "takes <strong>2.00" in clip and "certified" not in clip
    assert re.search(r"infusion \(quantized\) \(Δ log-odds 1\.00 \[[^]]+\]\) still succeeds", dp)
    assert "neutralises no attack" in dp and "(ε 2.00)" in dp and "<strong>5.00" in dp
    assert "it is inconclusive" in part and "in <strong>6 of 8 runs</strong>" in part  # 2 of 4 + 4 of 4
    assert "label-flip" not in clip  # an attack that does not succeed plainly is not judged
    assert "entirely below 0.1" in verdict  # the rule is stated
    section = html[html.index('id="hardening"'):html.index('id="figures"')]
    assert section.count("<svg") == 1 and section.count("<tr>") == 1 + 6
    assert ">neutralised</span>" in section and ">still succeeds</span>" in section
    assert "the clean control's accuracy minus that of a clean control with the same documents removed" in section
    assert "certified edit radius 2.5 [" in section and "k within it in 2 of 4 runs" in section
    assert "mitigation clip: retrain" in html  # the mitigated retrains' time in the provenance timings


def test_absent_without_mitigation_records(tmp_path):
    run = write_run(tmp_path, mitigations={})
    assert summarise(load_records(run))["mitigations"] == []
    html = render_report(run).read_text(encoding="utf-8")
    assert 'id="hardening"' not in html and "Trained under" not in html and "entirely below 0.1" not in html
    assert html.count("<svg") == 2  # success vs budget and defence only


def test_minimal_mitigation_records_render(tmp_path):
    """Records with only the required fields (no plain attack on their cells, no accuracy, time or figures) render,
    and the page says what is unknown rather than inventing it."""
    write_run(tmp_path, mitigations={}, defence=False)
    for i in range(2):
        append_jsonl(tmp_path / "results.jsonl", {"kind": "mitigation", "cell": f"orphan-{i}", "attack": "infusion",
                                                   "budget": {"k": 3}, "mitigation": "clip", "delta_logodds": 0.0})
    (row,) = summarise(load_records(tmp_path))["mitigations"]
    assert row["status"] == "too few targets" and row["unmitigated"]["n"] == 0 and row["acc_cost"]["n"] == 0
    html = render_report(tmp_path).read_text(encoding="utf-8")
    assert "an unrecorded amount of clean accuracy" in html and 'id="hardening"' in html


def test_hostile_mitigation_label_is_escaped(tmp_path):
    """A config-supplied label (with a '$' that matplotlib would read as TeX) and a figure's text, escaped; a
    figure that is not a number is left out, not shown."""
    under, acc, seconds, figures = MITIGATIONS["dp-sgd"]
    label = HOSTILE + " $\\x$"
    hostile = {label: (under, acc, seconds,
                       lambda i: {**figures(i), "epsilon_covers": HOSTILE, "clipped_fraction": "<b>all</b>"})}
    html = render_report(write_run(tmp_path, hostile)).read_text(encoding="utf-8")
    assert HOSTILE not in html and "<script" not in html.lower() and "<b>" not in html
    verdict = _verdict(html)
    assert f"Trained under <strong>{ESCAPED} $\\x$</strong> (ε 2.00)" in verdict
    section = html[html.index('id="hardening"'):html.index('id="figures"')]
    assert f"<tr><td>{ESCAPED} $\\x$</td>" in section and f"({ESCAPED})" in section  # label and epsilon_covers
    assert "clipped" not in section and section.count("<svg") == 1


@pytest.mark.browser
def test_section_renders_in_chromium(tmp_path):
    """The page loads offline with the section and its chart; the screenshot (the helper's 1280x2400 window; a
    run of one attack, two mitigations and no removal keeps the chart in it) shows the mitigations' markers,
    drawn in a colour (slate blue) that nothing else on this page uses."""
    run = write_run(tmp_path / "run", {name: MITIGATIONS[name] for name in ("clip", "partition")}, defence=False,
                    attacks={"infusion": ATTACKS["infusion"]})
    loaded = load_in_chromium(render_report(run), tmp_path)
    assert loaded["requests"] == []
    dom = Elements()
    dom.feed(loaded["dom"])
    assert {"verdict", "hardening"} <= dom.ids and dom.tags.get("svg", 0) == 2 and "script" not in dom.tags
    assert "Trained under <strong>clip</strong>" in loaded["dom"]
    shot = np.asarray(Image.open(loaded["screenshot"]).convert("RGB"), dtype=int)
    assert shot.shape == (2400, 1280, 3)
    slate_blue = np.abs(shot - np.array([106, 90, 205])).sum(axis=2) <= 12
    assert slate_blue.sum() > 100  # two squares and the legend's, a few hundred pixels
