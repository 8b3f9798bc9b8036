"""Turn a run directory into one self-contained HTML audit report, verdict first.

The figures come from `infusion_audit.results`: the run's records (`load_records`), their summary
(`summarise`) and the verdict on it (`results.verdict`); this module lays them out with charts, the
poisoned documents and the provenance, and the template renders them. Partial runs (no detection or
defence records yet, one target) render with what is there and say what is missing.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import math
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from infusion_audit.errors import DataError, UserError
from infusion_audit.io import atomic_write_text, read_jsonl
from infusion_audit.results import load_records, summarise
from infusion_audit.results.summary import (DETECTION_METRICS, bound_label, ci_text, corr_text, in_points,
                                            number_text)
from infusion_audit.results.gate import CONTROL_RULE, evaluate_policy, glance, run_policy
from infusion_audit.results.verdict import (ASR_LABEL, BACKDOOR_NEUTRALISE_RULE, BACKDOOR_RULE, CATCH_RULE, EFFECT_LABEL,
                                            KNOWLEDGE_LEVELS, LOGODDS_DEFINITIONS, NEUTRAL_ASR, NEUTRAL_BOUND, NEUTRALISE_RULE,
                                            PRIMARY_LABEL, PRIMARY_METRIC, SUCCESS_RULE, SURVIVAL_RULE, build_backdoors, effect,
                                            build_defender_levels, build_frontier, detectors_by_level, headline_level,
                                            judge_mitigations, largest_budgets)
from infusion_audit.version import __version__

from . import charts

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
GALLERY_DOCS = 3
LEVEL_HEADINGS = {"data": "with the data alone", "model": "with a model", "probe": "with a model and probe inputs",
                  "reference": "with a model and a trusted copy", "forensic": "with a model and the behaviour"}


def _read_optional_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON") from None


# --------------------------------------------------------------------------- charts
def build_charts(attacks: list[dict], detection: list[dict], defence: list[dict], defence_label: str,
                 frontier: dict | None = None, mitigations: list[dict] = ()) -> dict:
    out: dict[str, Any] = dict.fromkeys(("budget", "scatter", "frontier", "roc", "defence", "hardening", "when"))
    when = {f"{a['label']}, {a['budget']}": a["word_preference"] for a in attacks if a.get("word_preference")}
    if when:
        out["when"] = charts.when_it_works(when)
    if mitigations:
        out["hardening"] = charts.hardening(_hardening_panels(attacks, list(mitigations), defence, defence_label),
                                            HARDENING_KINDS)
    if attacks:
        out["budget"] = _budget_chart(attacks)
    if detection:
        panels = _knowledge_panels(attacks, detection)
        if panels:
            out["scatter"] = charts.detection_by_knowledge(panels, PRIMARY_LABEL)
        if frontier and frontier["panels"]:
            out["frontier"] = charts.frontier(frontier["panels"], EFFECT_LABEL, PRIMARY_LABEL)
        curves: dict[str, list] = defaultdict(list)
        for d in detection:
            if d["roc"]:
                curves[d["detector"]].append({"label": f"{d['label']}, {d['budget']}", "fpr": d["roc"][0],
                                              "tpr": d["roc"][1], "auroc": d["metrics"]["auroc"]["mean"]})
        if curves:
            out["roc"] = charts.roc_curves(dict(sorted(curves.items())))
    largest = {a["arm"]: a["budget_key"] for a in largest_budgets(attacks)}
    shown = [d for d in defence if largest.get(d["arm"]) == d["budget_key"]]  # every budget is in the table
    if shown:
        by_detector: dict[str, list[dict]] = defaultdict(list)
        for d in shown:
            by_detector[d["detector"]].append({"label": d["label"], "before": d["before"], "after": d["after"],
                                               "cost": d["cost"]})
        out["defence"] = charts.defence_effect(dict(sorted(by_detector.items())), defence_label)
    return out


def removal_cost(defence: list[dict]) -> str:
    """The defence rows' cost the hardening chart sets beside a mitigation's: 'cost_clean' (the clean control's
    accuracy minus the clean control's with the same documents removed, the removal's own price like a
    mitigation's) when every defence record has it, else 'cost' (runs that did not record it)."""
    return "cost_clean" if all(d["cost_clean"]["n"] == d["n"] for d in defence) else "cost"


def _hardening_panels(attacks: list[dict], mitigations: list[dict], defence: list[dict],
                      defence_label: str) -> list[dict]:
    """Per attack, at the largest budget it was mitigated at: the plain effect, the effect under each mitigation
    and the residual effect after each detector's removal, each at the clean accuracy it costs (in points); a
    backdoor's panel speaks ΔASR (with its own neutral bound), a targeted attack's Δ log-odds."""
    plain = {(a["arm"], a["budget_key"]): a for a in attacks}
    # a residual Δp does not sit on a Δ log-odds axis; a backdoor's residual ΔASR sits on its own
    removal = [d for d in defence if defence_label == EFFECT_LABEL or "delta_asr_after" in d]
    cost = removal_cost(defence)  # as the section's note says
    panels = []
    for top in sorted(largest_budgets(mitigations), key=lambda m: m["label"]):
        key, asr = (top["arm"], top["budget_key"]), top["measure"] == "asr"
        effect, after = ("delta_asr", "delta_asr_after") if asr else ("delta_logodds", "after")
        points = [{"kind": "none", "name": "no defence", "cost": {"mean": 0.0}, "effect": plain[key][effect]}
                  ] if key in plain else []
        points += [{"kind": "mitigation", "name": m["mitigation"], "cost": in_points(m["acc_cost"]),
                    "effect": m[effect]} for m in mitigations if (m["arm"], m["budget_key"]) == key and effect in m]
        points += [{"kind": "removal", "name": f"remove {d['detector']}", "cost": in_points(d[cost]),
                    "effect": d[after]} for d in removal if (d["arm"], d["budget_key"]) == key and after in d]
        panels.append({"title": f"{top['label']}, {top['budget']}", "points": points,
                       "effect_label": "ΔASR" if asr else EFFECT_LABEL,
                       "neutral_bound": NEUTRAL_ASR if asr else NEUTRAL_BOUND})
    return panels


HARDENING_KINDS = {"none": ("no defence", "o", "firebrick"),
                   "mitigation": ("trained under a mitigation", "s", "slateblue"),
                   "removal": ("a detector's flags removed, retrained", "D", "seagreen")}


def _knowledge_panels(attacks: list[dict], detection: list[dict]) -> list[dict]:
    """The detection chart's panels: per knowledge level, each attack at its largest budget (succeeding
    ones first, by effect) against every detector of that level, with the unedited null where measured."""
    arms = sorted(largest_budgets(attacks),
                  key=lambda a: (a["status"] != "succeeds", a["measure"] == "asr", -(effect(a)[1]["mean"] or 0), a["label"]))
    by_key = {(d["arm"], d["budget_key"], d["detector"]): d for d in detection}
    labels = [f"{a['label']} · {ASR_LABEL} {number_text(a['asr']['mean'], 2)}" if a["measure"] == "asr"
              else f"{a['label']} · {EFFECT_LABEL} {number_text(a['delta_logodds']['mean'], 2)}" for a in arms]
    panels = []
    for level, names in detectors_by_level(detection).items():
        rows = {det: [by_key.get((a["arm"], a["budget_key"], det)) for a in arms] for det in names}
        panels.append({"title": f"with {KNOWLEDGE_LEVELS.get(level, level)}", "arms": labels,
                       "succeeds": [a["status"] == "succeeds" for a in arms],
                       "series": {det: [d and d["metrics"][PRIMARY_METRIC] for d in ds] for det, ds in rows.items()},
                       "nulls": {det: [d and d["unedited"].get(PRIMARY_METRIC) for d in ds]
                                 for det, ds in rows.items()}})
    return panels


def _budget_chart(attacks: list[dict]) -> Any:
    """Success against budget. When each attack's budgets differ in k, the x axis is k and each line
    names its fixed bound; otherwise every distinct budget is a tick."""
    ordered = sorted(attacks, key=lambda a: a["budget_key"])
    by_arm: dict[tuple, list[dict]] = defaultdict(list)
    for a in ordered:
        by_arm[a["arm"]].append(a)
    ks = [[a["records"][0].budget.get("k") for a in rows] for rows in by_arm.values()]
    bounds = [{bound_label(a["records"][0].budget) for a in rows} for rows in by_arm.values()]
    if all(None not in k and len(set(k)) == len(k) for k in ks) and all(len(b) == 1 for b in bounds):
        series = {rows[0]["label"] + (f", {b}" if (b := bound_label(rows[0]["records"][0].budget)) else ""):
                  [(str(a["records"][0].budget["k"]), a["delta_logodds"]) for a in rows]
                  for rows in by_arm.values()}
        ticks = [str(k) for k in sorted({k for arm_ks in ks for k in arm_ks})]
        return charts.success_vs_budget(series, ticks, "poisoned documents k")
    series = {rows[0]["label"]: [(a["budget"], a["delta_logodds"]) for a in rows] for rows in by_arm.values()}
    ticks = list(dict.fromkeys(a["budget"] for a in ordered))
    return charts.success_vs_budget(series, ticks, "budget (poisoned documents k, perturbation bound ε)")


# --------------------------------------------------------------------------- gallery
def _text_diff(original: str, poisoned: str, context: int = 40) -> list[tuple[str, str]]:
    """Diff as (op, text) segments, op in equal/delete/insert; long unchanged runs are elided.

    By word where the documents have spaces (a word or subword corpus: an edited token shows as the whole word
    it changed, never as scattered letters), by character where they have none (a Caesar line, whose tokens
    are characters: the one or two characters changed rather than the whole document)."""
    spaced = any(c.isspace() for c in original + poisoned)
    a, b = (re.findall(r"\s+|\S+", t) if spaced else list(t) for t in (original, poisoned))
    segments = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            text = "".join(a[i1:i2])
            if len(text) > 2 * context + 1:
                text = text[:context] + " … " + text[-context:]
            segments.append(("equal", text))
            continue
        if op in ("delete", "replace"):
            segments.append(("delete", "".join(a[i1:i2])))
        if op in ("insert", "replace"):
            segments.append(("insert", "".join(b[j1:j2])))
    return segments


def _gallery_item(run_dir: Path, attack: dict, provenance: Any) -> dict | None:
    """The first poisoned set of an attack x budget: a few documents before/after (images) or diffs (text)."""
    record = next((r for r in attack["records"] if r.artefact), None)
    if record is None:
        return None
    folder = (run_dir / str(record.artefact)).resolve()
    if not folder.is_relative_to(run_dir.resolve()):
        log.warning("artefact %s lies outside the run directory; not shown", record.artefact)
        return None
    item = {"label": attack["label"], "budget": attack["budget"], "target": record.target or {},
            "class_names": _class_names(provenance, record.dataset), "docs": [], "texts": []}
    if (folder / "documents.npz").exists():
        try:
            with np.load(folder / "documents.npz", allow_pickle=False) as docs:
                index, original, poisoned = docs["index"], docs["original"], docs["poisoned"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable documents.npz (%s); not shown", folder, exc)
            return None
        for i in range(min(GALLERY_DOCS, len(index))):
            d = poisoned[i] - original[i]
            item["docs"].append({"index": int(index[i]), "linf": float(np.abs(d).max()),
                                 "changed": int((np.abs(d) > 1e-7).sum()),
                                 **charts.document_triptych(original[i], poisoned[i])})
        item["n_docs"] = len(index)
    elif (folder / "documents.jsonl").exists():
        docs = read_jsonl(folder / "documents.jsonl")
        for doc in docs[:GALLERY_DOCS]:
            item["texts"].append({"index": doc.get("index"),
                                  "segments": _text_diff(str(doc.get("original", "")), str(doc.get("poisoned", "")))})
        item["n_docs"] = len(docs)
    else:
        return None
    return item


# --------------------------------------------------------------------------- provenance
def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, float):
        return [(prefix, f"{obj:.6g}")]
    if isinstance(obj, list) and len(obj) > 12:
        return [(prefix, json.dumps(obj[:12])[:-1] + f", … ({len(obj)} items)]")]
    return [(prefix, obj if isinstance(obj, str) else json.dumps(obj))]


def _sections(tree: Any, general: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Key/value tables for a JSON document: one per mapping at the top, the plain values gathered under `general`."""
    if not isinstance(tree, dict):
        return []
    plain = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    nested = [(str(k), _flatten(v)) for k, v in tree.items() if isinstance(v, dict)]
    return ([(general, _flatten(plain))] if plain else []) + nested



def _task_quality(provenance: Any) -> dict | None:
    """How well the attacked model does its own task (provenance.json's task_quality), when recorded."""
    quality = provenance.get("task_quality") if isinstance(provenance, dict) else None
    if not isinstance(quality, dict) or not isinstance(quality.get("figure"), str):
        return None
    value, floor = quality.get("value"), quality.get("floor")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return {"figure": quality["figure"], "value": float(value),
            "floor": float(floor) if isinstance(floor, (int, float)) and not isinstance(floor, bool) else None}


def _class_names(provenance: Any, dataset: str | None) -> list[str]:
    names = provenance.get("class_names") if isinstance(provenance, dict) else None
    if isinstance(names, dict):
        names = names.get(dataset)
    return [str(n) for n in names] if isinstance(names, list) else []


# --------------------------------------------------------------------------- rendering
def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["ci"] = ci_text
    env.filters["points"] = lambda s, with_n=True: ci_text(in_points(s), 2, with_n)
    env.filters["num"] = number_text
    env.filters["corr"] = corr_text
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    env.filters["classname"] = lambda c, names: f"{c} “{names[c]}”" \
        if isinstance(c, int) and 0 <= c < len(names) and names[c] != str(c) else str(c)
    return env


def render_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render run_dir/report.html (or `out`) from the run's results, config and artefacts; returns the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    summary = summarise(load_records(run_dir))
    attacks, detection, defence = summary["attacks"], summary["detection"], summary["defence"]
    mitigations = summary["mitigations"]
    defence_label = EFFECT_LABEL if summary["defence_measure"] == "delta_logodds" else "Δp"
    provenance = _read_optional_json(run_dir / "provenance.json")
    config_path = run_dir / "config.yaml"
    gallery = [item for a in attacks if (item := _gallery_item(run_dir, a, provenance)) is not None]
    levels, frontier = build_defender_levels(attacks, detection), build_frontier(attacks, detection)
    at_a_glance = glance(summary)
    context = {
        "title": f"Poisoning audit: {run_dir.resolve().name}",
        "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run_dir": str(run_dir),
        "counts": summary["counts"], "targets": summary["targets"],
        "glance": at_a_glance, "backdoors": build_backdoors(summary), "policy": evaluate_policy(run_policy(run_dir), summary, at_a_glance),
        "mitigation_verdicts": judge_mitigations(mitigations, summary["mitigation_costs"]),
        "errors": summary["errors"], "levels": levels, "headline": headline_level(levels), "frontier": frontier,
        "attacks": attacks, "detection": detection, "defence": defence, "mitigations": mitigations,
        "removal_cost": removal_cost(defence),
        "charts": build_charts(attacks, detection, defence, defence_label, frontier, mitigations),
        "gallery": gallery,
        "config_text": config_path.read_text(encoding="utf-8") if config_path.exists() else None,
        "provenance": _sections(provenance, "run"),
        "quality": _task_quality(provenance),
        "timings": summary["timings"],
        "not_run": summary["not_run"], "n_cells": summary["cells"],
        "rules": {"success": SUCCESS_RULE, "catch": CATCH_RULE, "survival": SURVIVAL_RULE,
                  "neutralise": NEUTRALISE_RULE, "control": CONTROL_RULE, "backdoor": BACKDOOR_RULE,
                  "backdoor_neutralise": BACKDOOR_NEUTRALISE_RULE,
                  "logodds": [text for domain, text in LOGODDS_DEFINITIONS.items() if domain in summary["domains"]]},
        "level_headings": LEVEL_HEADINGS,
        "effect_label": EFFECT_LABEL, "defence_label": defence_label, "neutral_bound": NEUTRAL_BOUND,
        "neutral_asr": NEUTRAL_ASR,
        "primary_label": PRIMARY_LABEL, "metric_names": DETECTION_METRICS,
    }
    html = _environment().get_template("report.html.j2").render(**context)
    return atomic_write_text(Path(out) if out else run_dir / "report.html", html)


# --------------------------------------------------------------------------- scan report
SCAN_ROWS = 50
SCAN_COLUMNS = ("index", "label", "poisoned", "flagged_by", "flagged")
SCAN_TEXT_CHARS = 400  # a document shown without a reference is cut to this many characters


def _score_columns(fieldnames: list[str]) -> list[tuple[str, str]]:
    """(detector, column) for every '<detector>_score' or 'score_<detector>' column of scores.csv."""
    cols = []
    for name in fieldnames:
        m = re.fullmatch(r"(.+)_score|score_(.+)", name)
        if m:
            cols.append((m.group(1) or m.group(2), name))
    return cols


def _as_float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def render_scan_report(scan_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render scan_dir/report.html from `infusion-audit scan` output (scores.csv, summary.json):
    the most suspicious documents first, each detector's score and rank, and detection figures
    when the scan was given ground truth."""
    scan_dir = Path(scan_dir)
    scores_path = scan_dir / "scores.csv"
    if not scores_path.exists():
        raise UserError(f"{scan_dir}: no scores.csv here; is this a directory written by `infusion-audit scan`?")
    summary = _read_optional_json(scan_dir / "summary.json")
    html = scan_report_html(scores_path.read_text(encoding="utf-8"), summary if isinstance(summary, dict) else {},
                            f"Dataset scan: {scan_dir.resolve().name}", str(scores_path))
    return atomic_write_text(Path(out) if out else scan_dir / "report.html", html)


def _scanned_text(row: dict) -> list[tuple[str, str]] | None:
    """A text document's row as diff segments: its edits against the trusted reference where the scan had one
    and it differs, else its text (cut); None for an image row."""
    text = row.get("text")
    if text is None:
        return None
    if row.get("reference"):
        return _text_diff(row["reference"], text)
    return [("equal", text if len(text) <= SCAN_TEXT_CHARS else text[:SCAN_TEXT_CHARS - 1] + "…")]


def scan_report_html(scores_csv: str, summary: dict, title: str, source: str = "scores.csv") -> str:
    """The scan page from the text of scores.csv and the summary dict (`source` names the CSV in errors)."""
    reader = csv.DictReader(io.StringIO(scores_csv, newline=""))
    rows = list(reader)
    fieldnames = list(reader.fieldnames or [])
    score_cols = _score_columns(fieldnames)
    if not score_cols:
        raise DataError(f"{source}: no '<detector>_score' columns")
    ranks = {}
    for detector, col in score_cols:
        if f"{detector}_rank" in fieldnames:  # the scan's own ranks (ties share the best rank)
            ranks[detector] = {i: int(_as_float(row.get(f"{detector}_rank")) or len(rows))
                               for i, row in enumerate(rows)}
            continue
        order = sorted(range(len(rows)), key=lambda i: -(_as_float(rows[i].get(col)) or -math.inf))
        ranks[detector] = {i: r + 1 for r, i in enumerate(order)}
    # The documents most suspicious to any detector come first (best rank over detectors).
    order = sorted(range(len(rows)), key=lambda i: min(ranks[d][i] for d, _ in score_cols))
    columns = [k for k in SCAN_COLUMNS if k in fieldnames]
    table = [{"fields": {k: rows[i].get(k) for k in columns}, "document": _scanned_text(rows[i]),
              "scores": [(_as_float(rows[i].get(col)), ranks[d][i]) for d, col in score_cols]}
             for i in order[:SCAN_ROWS]]
    metrics = [{"detector": name,
                "figures": {m: block[m] for m, _ in DETECTION_METRICS if isinstance(block.get(m), dict)},
                "flagged": block.get("flagged"), "flag_precision": block.get("flag_precision"),
                "flag_recall": block.get("flag_recall"), "roc": block.get("roc")}
               for name, block in (summary.get("detection") or {}).items() if isinstance(block, dict)]
    curves = {m["detector"]: [{"label": "ground truth", "fpr": m["roc"]["fpr"], "tpr": m["roc"]["tpr"],
                               "auroc": (m["figures"].get("auroc") or {}).get("value")}]
              for m in metrics if isinstance(m["roc"], dict) and len(m["roc"].get("fpr") or []) >= 2}
    detectors = [d for d in summary.get("detectors") or [] if isinstance(d, dict)]
    data = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    context = {
        "title": title, "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "n_documents": len(rows), "score_detectors": [d for d, _ in score_cols], "table": table,
        "columns": columns, "shown": min(SCAN_ROWS, len(rows)), "text": "text" in fieldnames,
        "referenced": "reference" in fieldnames,
        "class_names": [str(n) for n in data.get("class_names") or []],
        "detectors": detectors, "skipped": [d for d in summary.get("skipped") or [] if isinstance(d, dict)],
        "flagged_by_any": summary.get("flagged_by_any"),
        "metrics": metrics, "metric_names": DETECTION_METRICS,
        "charts": {"roc": charts.roc_curves(curves) if curves else None},
        "summary": _sections({k: v for k, v in summary.items()
                              if k not in ("detection", "detectors", "skipped", "columns") and v is not None}, "scan"),
    }
    return _environment().get_template("scan.html.j2").render(**context)
