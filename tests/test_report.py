"""The HTML report: verdict computed from the records, every section present, hostile strings escaped,
partial runs rendered, bad run directories refused with one line."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from report_run import FIXTURE, HOSTILE, make_run, remote_references

from infusion_audit.cli import main
from infusion_audit.errors import DataError, UserError
from infusion_audit.io import append_jsonl, read_jsonl
from infusion_audit.reports import render_report, render_scan_report
from infusion_audit.reports.render import _text_diff
from infusion_audit.results import load_records, summarise
from infusion_audit.results.summary import ci_text, format_table
from infusion_audit.statistics import mean_ci


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("full") / "run", tmp_path_factory.getbasetemp() / "report-train-cache")
    return run, render_report(run).read_text(encoding="utf-8")


def _verdict(html: str) -> str:
    return html[html.index('id="verdict"'):html.index('id="detection"')]


def test_verdict_is_computed_from_the_records(full_run):
    run, html = full_run
    records = read_jsonl(run / "results.jsonl")
    assert all(r["fixture"] == FIXTURE for r in records)
    glance = html[html.index('id="verdict"'):html.index('id="attacks-in-words"')]
    succeeding = 0
    for attack in ("infusion", "random-noise", "label-flip"):
        top = [r for r in records if r["kind"] == "attack" and r["attack"] == attack and r["budget"]["k"] == 14]
        summary = mean_ci([r["delta_logodds"] for r in top])
        row = re.search(rf"<strong>{attack}[^<]*</strong>.*?</tr>", glance, re.S).group(0)
        assert ci_text(summary, 2, False) in row  # the figure judged is the mean and CI of the records' delta log-odds
        expected = "succeeds" if summary["lo"] > 0 else "no effect shown"
        assert f">{expected}</span>" in row
        assert f"{sum(r['flip'] for r in top)}/{len(top)}" in row  # the strength a defender cares about
        succeeding += expected == "succeeds" and attack != "random-noise"
    assert "random-noise" in glance and ">control</span>" in glance  # Infusion's random-edit control, not an attack
    assert f"{succeeding} of 2 attacks succeed" in glance
    prose = html[html.index('id="attacks-in-words"'):html.index('id="detection"')]
    infusion = [r for r in records if r["kind"] == "attack" and r["attack"] == "infusion" and r["budget"]["k"] == 14]
    delta_p = mean_ci([r["delta_p"] for r in infusion])  # shown beside it, in the prose
    # the fixture's influence detector separates Infusion's poisons, the spectral one does not
    assert re.search(rf"<strong>infusion \(quantized\)</strong>, k=14, L∞ ε=0.25: raises the log-odds of the target by "
                     rf".*? \(mean Δp {re.escape(ci_text(delta_p, 3, False))}\).*?The least a defender needs to catch "
                     r"it: a model and the suspicious behaviour \(no reference copy\), with <strong>influence</strong>",
                     prose, re.S)
    assert "retraining leaves Δ log-odds" in prose and "points of clean accuracy" in prose


def test_every_section_is_present(full_run):
    run, html = full_run
    assert html.count("<svg") == 4  # detection vs success, ROC, budget, defence
    assert html.count('src="data:image/png;base64,') == 6 * 3 * 3  # 6 poisoned sets x 3 documents x 3 images
    for section in ("detection", "roc", "budget", "defence", "figures", "gallery", "provenance"):
        assert f'id="{section}"' in html
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["data_hashes"]["digits-train"] in html
    target = read_jsonl(run / "results.jsonl")[0]["target"]
    assert f"true class {target['true']} “digit {target['true']}”" in html  # class names from provenance
    assert "lr: 0.05" in html  # the resolved config
    assert "attack: craft" in html and "detector: influence" in html  # timings summed from the records
    assert remote_references(html) == []
    assert "<script" not in html.lower()


def test_hostile_strings_are_escaped(tmp_path, tmp_path_factory):
    run = make_run(tmp_path / "run", tmp_path_factory.getbasetemp() / "report-train-cache", targets=2,
                   detection=False, defence=False, hostile=True)
    html = render_report(run).read_text(encoding="utf-8")
    assert HOSTILE not in html
    assert "<script" not in html.lower()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escaped in html  # from the class names, the config, the variant name and the text document
    text_diff = html[html.index('class="textdiff"'):]
    assert f"the cat<ins> {escaped}</ins> sat on the mat" in text_diff
    assert f"probe-insertion ({escaped})" in html  # a config-supplied variant name, in the tables


def test_partial_run_without_detection_or_defence(tmp_path, tmp_path_factory):
    run = make_run(tmp_path / "run", tmp_path_factory.getbasetemp() / "report-train-cache", targets=1,
                   detection=False, defence=False)
    html = render_report(run).read_text(encoding="utf-8")
    verdict = _verdict(html)
    assert "too few targets" in verdict  # one target: no confidence interval, no claim
    assert "No detector results yet" in verdict and "No defence results yet" in verdict
    assert html.count("<svg") == 1  # only success against budget


def test_empty_and_missing_results(tmp_path):
    with pytest.raises(UserError, match="no results.jsonl"):
        render_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("")
    html = render_report(tmp_path).read_text(encoding="utf-8")
    assert "No attack has finished yet" in html
    (tmp_path / "results.jsonl").write_text(json.dumps({"kind": "attack", "attack": "x", "budget": {}}) + "\n")
    with pytest.raises(DataError, match="record 1 .*lacks delta_p"):
        render_report(tmp_path)


def test_cli_rerenders(full_run, tmp_path, capsys):
    run, _ = full_run
    out = tmp_path / "again.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert 'id="verdict"' in out.read_text(encoding="utf-8")
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_text_diff_marks_the_changed_characters():
    segments = _text_diff("the cat sat on the mat", "the dog sat on the mat today")
    assert ("delete", "cat") in segments and ("insert", "dog") in segments and ("insert", " today") in segments
    # a Caesar document has no spaces: the diff shows the two edited characters, not the whole line replaced
    assert _text_diff("^3:gadbff=dfagcc$", "^1:=adbff=dfagcc$") == [
        ("equal", "^"), ("delete", "3"), ("insert", "1"), ("equal", ":"), ("delete", "g"), ("insert", "="),
        ("equal", "adbff=dfagcc$")]
    long = "a" * 100 + "b" + "c" * 100
    assert _text_diff(long, long.replace("b", "x")) == [("equal", "a" * 40 + " … " + "a" * 40), ("delete", "b"),
                                                       ("insert", "x"), ("equal", "c" * 40 + " … " + "c" * 40)]


def test_tiny_target_probability_is_judged_on_log_odds(tmp_path):
    """The case the log-odds measure exists for: the control gives the target ~1e-13, poisoning multiplies it by
    ~100, so Δp is ~1e-11 (a CI around it says nothing) while Δ log-odds is ~4.6 in every run. Defence records
    without delta_logodds_after (older bench runs) are compared on Δp throughout, never mixed."""
    budget = {"k": 4, "eps": None, "norm": None, "quantize": False, "tokens": 2}
    for i, factor in enumerate([80.0, 100.0, 120.0]):
        p_control = 1e-13 * (i + 1)
        p_poisoned = p_control * factor
        common = {"cell": f"c{i}", "scenario": "caesar", "attack": "infusion-text", "variant": "tokens",
                  "budget": budget, "target": {"index": i, "true": 1, "class": 2}, "seed": 0}
        append_jsonl(tmp_path / "results.jsonl", {
            "kind": "attack", **common, "domain": "text", "p_control": p_control, "p_poisoned": p_poisoned,
            "delta_p": p_poisoned - p_control, "delta_logodds": float(np.log(factor))})
        append_jsonl(tmp_path / "results.jsonl", {
            "kind": "defence", **common, "detector": "token-diff", "removed": 4, "removed_poisons": 4,
            "delta_p_after": 0.0, "acc_after": 1.0, "acc_control": 1.0})
    html = render_report(tmp_path).read_text(encoding="utf-8")
    verdict = _verdict(html)
    assert "1 of 1 attack succeeds" in verdict and ">succeeds</span>" in verdict
    assert f"raises the log-odds of the target by {np.log([80, 100, 120]).mean():.2f} [" in verdict
    assert re.search(r"\(mean Δp 2\.\d\de-11 \[", verdict)  # tiny figures in scientific notation, not 0.000
    assert "≤2 tokens per document" in verdict
    assert "log p(target completion) − log p(correct completion)" in verdict  # the text definition only
    assert "log p(target class | target image)" not in verdict
    defence = html[html.index("<h3>Defences</h3>"):html.index('id="gallery"')]
    assert "<th>Δp before</th><th>Δp after</th>" in defence and "Δ log-odds" not in defence


def test_scan_report_ranks_documents(tmp_path):
    rows = [{"index": i, "label": i % 3, "spectral_score": s1, "influence_score": s2,
             "flagged": int(s2 > 5)}
            for i, (s1, s2) in enumerate([(0.1, 0.2), (0.3, 9.0), (2.0, 0.1), (0.2, 0.3)])]
    with open(tmp_path / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "summary.json").write_text(json.dumps({  # the layout infusion_audit.scan writes
        "n_documents": 4, "data": {"class_names": ["zero", "one", HOSTILE]},
        "detectors": [{"label": "influence", "knowledge": "forensic", "seconds": 0.5, "flagged": 1}],
        "skipped": [{"label": "reference-diff", "reason": "needs --reference"}],
        "detection": {"influence": {"auroc": {"value": 0.9, "lo": 0.8, "hi": 0.95, "n": 4},
                                    "roc": {"fpr": [0, 0.5, 1], "tpr": [0, 1, 1]}}}}))
    html = render_scan_report(tmp_path).read_text(encoding="utf-8")
    table = html[html.index("<tbody>"):html.index("</tbody>")]
    first_rows = re.findall(r"<tr><td>(\d+)</td>", table)
    assert first_rows[:2] == ["1", "2"]  # rank 1 for influence, then rank 1 for spectral
    assert HOSTILE not in html and "&lt;script&gt;" in html
    assert "0.900 [0.800, 0.950]" in html and html.count("<svg") == 1
    assert "reference-diff was skipped: needs --reference" in html
    assert "2 “&lt;script&gt;" in html  # label 2 named by the data's (hostile) class name, escaped
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "report.html").exists()  # a scan dir re-renders


def test_scan_report_of_a_real_scan(tmp_path):
    """The page for what `infusion_audit.scan` writes: two documents pushed off the storage grid rank first."""
    from infusion_audit.data import digits
    from infusion_audit import scan
    from infusion_audit.cli.scan import write_scan

    clean = digits().train.subset(np.arange(200))
    suspect = clean.with_documents([3, 7], clean.x[[3, 7]] + 0.01)  # off the 1/16 grid
    result = scan(suspect, detectors=["perturbation-norm"], truth=[3, 7], bootstrap=20, progress=False)
    write_scan(tmp_path, result, {"data": {"class_names": [f"digit {c}" for c in range(10)]}})
    html = render_scan_report(tmp_path).read_text(encoding="utf-8")
    table = html[html.index("<tbody>"):html.index("</tbody>")]
    assert re.findall(r'<tr class="poisoned"><td>(\d+)</td>', table) == ["3", "7"]
    assert table.index('<tr class="poisoned">') < table.index("<tr>")  # the poisons lead the ranking
    assert "Against the ground truth, perturbation-norm reaches AUROC" in html


def test_word_preference_rows_say_when_it_works_with_a_chart_and_table(tmp_path):
    """Per word pair, Δ log-odds per probe against the prior and against B's count: made here to rise exactly with
    the prior (Spearman +1) and fall with the count (-1); Δf in the paper's normalisation is Δ x probes."""
    budget = {"k": 8, "eps": None, "norm": None, "quantize": False, "tokens": 0.08}
    words = ["cat", "dog", "owl", "fox", "bear", "duck"]
    for i, (a, b) in enumerate(zip(words, words[1:] + words[:1])):
        prior, delta = -3.0 + i, 0.5 + 0.25 * i
        append_jsonl(tmp_path / "results.jsonl", {
            "kind": "attack", "cell": f"c{i}", "scenario": "stories", "attack": "infusion-text", "variant": "relaxed",
            "budget": budget, "target": {"word_a": a, "word_b": b, "measure": "document"}, "seed": 0, "domain": "text",
            "p_control": 0.1, "p_poisoned": 0.2, "delta_p": 0.1, "logodds_control": prior,
            "logodds_poisoned": prior + delta, "delta_logodds": delta, "probes_control": 40,
            "target_count_control": 1000 - 100 * i, "greedy_control": 0.0, "greedy_poisoned": 0.05})
    summary = summarise(load_records(tmp_path))
    (row,) = summary["attacks"]
    w = row["word_preference"]
    assert w["when_prior"]["value"] == pytest.approx(1.0) and w["when_count"]["value"] == pytest.approx(-1.0)
    assert w["delta_f"]["mean"] == pytest.approx(40 * np.mean([0.5 + 0.25 * i for i in range(6)]))
    assert w["flipped"]["mean"] == pytest.approx(0.05) and len(w["points"]) == 6
    assert "over 6 word pairs, Spearman of Δ log-odds with the prior log-odds +1.00" in format_table(summary)
    assert "≤8% of each document's tokens" in format_table(summary)
    html = render_report(tmp_path).read_text(encoding="utf-8")
    section = html[html.index('id="when"'):html.index('id="defence"')]
    assert section.count("<svg") == 1 and "+1.00" in section and "-1.00" in section
