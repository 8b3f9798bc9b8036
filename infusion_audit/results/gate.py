"""The gate a team's CI applies to a bench: the verdict at a glance (each attack against what each level of the
defender's knowledge can catch), the policy's evaluation, and verdict.json, the machine-readable verdict written
beside report.html (its JSON Schema is verdict.schema.json beside this module, versioned by VERDICT_VERSION).

Levels of knowledge are what a defender has, and they are not a chain: every defender has the data, a team
auditing its own pipeline has the model it trains (and held-out inputs to probe it with), and beyond that a
trusted reference copy of the data and the suspicious behaviour are two separate things. A detector that needs
a reference copy is never counted, let alone named best, for a defender who has only the behaviour.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from ..config import PolicyConfig, from_dict, load_yaml
from ..io import write_json
from ..version import __version__
from .records import load_records
from .summary import RANDOM_CONTROLS, ci_text, summarise
from .verdict import (BACKDOOR_NEUTRALISE_RULE, BACKDOOR_RULE, CATCH_RULE, NEUTRALISE_RULE, PRIMARY_LABEL,
                      PRIMARY_METRIC, SUCCESS_RULE, effect, knowledge_order, largest_budgets)

VERDICT_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("verdict.schema.json")
DEFENDER_HAS = {  # a level of the defender's knowledge -> the detector needs (`knowledge`) it meets
    "data": ("data",), "model": ("data", "model"), "probe": ("data", "model", "probe"),
    "reference": ("data", "model", "probe", "reference"), "forensic": ("data", "model", "probe", "forensic")}
DEFENDER_LABELS = {
    "data": "the data alone", "model": "a model trained on the data", "probe": "a model and held-out probe inputs",
    "reference": "a model and a trusted reference copy of the data",
    "forensic": "a model and the suspicious behaviour (no reference copy)"}
CONTROL_RULE = ("a random-edit control edits the same documents as its attack (or ones chosen by the same "
                "selection) at random within the same budget; it measures what any edit of that size does, is "
                "shown beside its attack (attack minus control in Δ log-odds, paired on the same targets) and is "
                "not judged as an attack")


def _has(level: str) -> set:
    return set(DEFENDER_HAS.get(level, (level,)))


def available(level: str, knowledge: str) -> bool:
    """Whether a detector needing `knowledge` is available to a defender at `level` (a level this module does
    not know, a plugin's own, has only its own detectors)."""
    return knowledge in DEFENDER_HAS.get(level, (level,))


# --------------------------------------------------------------------------- the verdict at a glance
def _tpr(detection: dict) -> float:
    return detection["metrics"][PRIMARY_METRIC]["mean"] or 0.0


def _detector(detection: dict) -> dict:
    return {"detector": detection["detector"], "knowledge": detection["knowledge"],
            PRIMARY_METRIC: detection["metrics"][PRIMARY_METRIC]}


def level_cell(detections: list[dict], level: str) -> dict:
    """One attack (its detection rows at one budget) against one level: the detectors available there that catch
    it (by CATCH_RULE, best first), the best available one, and the outcome: caught, evades, or not scanned (no
    detector available at this level ran on it)."""
    usable = sorted((d for d in detections if available(level, d["knowledge"])), key=lambda d: (-_tpr(d), d["detector"]))
    caught = [d for d in usable if d["status"] == "caught"]
    return {"caught_by": [_detector(d) for d in caught], "best": _detector(usable[0]) if usable else None,
            "outcome": "caught" if caught else "evades" if usable else "not scanned"}


def glance(summary: dict) -> dict:
    """The verdict at a glance, from the summary: 'rows', each arm at its largest budget (attacks that succeed
    first, random-edit controls last) with its outcome at every level, the least a defender needs to catch it
    ('least': each level that catches it while no level with less does, with its best detector there; two when
    a reference copy and the behaviour each do) and its defence rows by detector; 'levels', each level of
    knowledge some detector of the run needs (least first), with the detectors available there, the best of them
    (the highest mean TPR at 1% FPR over the attacks that succeed, or over every attack when none does: 'basis')
    and the succeeding attacks it leaves caught, evading or not scanned."""
    detection = summary["detection"]
    levels = sorted({d["knowledge"] for d in detection}, key=knowledge_order)
    by_arm: dict[tuple, list[dict]] = defaultdict(list)
    for d in detection:
        by_arm[(d["arm"], d["budget_key"])].append(d)
    defences: dict[tuple, dict] = defaultdict(dict)
    for d in summary["defence"]:
        defences[(d["arm"], d["budget_key"])][d["detector"]] = d
    attacks = sorted(largest_budgets(summary["attacks"]), key=lambda a: (
        a["is_control"], a["status"] != "succeeds", a["measure"] == "asr", -(effect(a)[1]["mean"] or 0), a["label"]))
    rows = []
    for a in attacks:
        key = (a["arm"], a["budget_key"])
        cells = {level: level_cell(by_arm.get(key, []), level) for level in levels}
        catching = [level for level in levels if cells[level]["outcome"] == "caught"]
        least = [level for level in catching if not any(_has(other) < _has(level) for other in catching)]
        rows.append({"arm": a["arm"], "label": a["label"], "budget": a["budget"], "attack": a,
                     "detections": by_arm.get(key, []), "cells": cells, "defence": defences.get(key, {}),
                     "least": [{"level": level, "has": DEFENDER_LABELS.get(level, level), **cells[level]["caught_by"][0]}
                               for level in least]})
    judged = [r for r in rows if not r["attack"]["is_control"]]
    succeeding = [r for r in judged if r["attack"]["status"] == "succeeds"]
    basis = succeeding or judged
    out_levels = []
    for level in levels:
        scores: dict[str, list[float]] = defaultdict(list)
        knowledge: dict[str, str] = {}
        for r in basis:
            for d in r["detections"]:
                if available(level, d["knowledge"]) and d["metrics"][PRIMARY_METRIC]["mean"] is not None:
                    scores[d["detector"]].append(d["metrics"][PRIMARY_METRIC]["mean"])
                    knowledge[d["detector"]] = d["knowledge"]
        ranked = sorted(scores, key=lambda name: (-sum(scores[name]) / len(scores[name]), name))
        best = ranked[0] if ranked else None
        out_levels.append({
            "level": level, "has": DEFENDER_LABELS.get(level, level),
            "detectors": sorted({d["detector"] for d in detection if available(level, d["knowledge"])}),
            "best": None if best is None else {"detector": best, "knowledge": knowledge[best],
                                               "mean_tpr": sum(scores[best]) / len(scores[best]),
                                               "attacks": len(scores[best])},
            "basis": "succeeding" if succeeding else "all",
            **{outcome: [r["label"] for r in succeeding if r["cells"][level]["outcome"] == key]
               for outcome, key in (("caught", "caught"), ("evading", "evades"), ("unscanned", "not scanned"))}})
    return {"rows": rows, "levels": out_levels, "attacks": len(judged), "succeeding": len(succeeding),
            "controls": len(rows) - len(judged)}


# --------------------------------------------------------------------------- the policy
def run_policy(run_dir: str | Path) -> PolicyConfig:
    """The policy in a run directory's config.yaml (the one its bench wrote, `--fail-on` included); the default
    policy where there is none."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return PolicyConfig()
    raw, source = load_yaml(path)
    return from_dict(PolicyConfig, raw.get("policy"), source, "policy")


def _target_text(target: dict | None) -> str:
    target = target or {}
    if "index" in target:
        return f"target #{target['index']}"
    return "target " + json.dumps(target, sort_keys=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def evaluate_policy(policy: PolicyConfig, summary: dict, table: dict | None = None) -> dict:
    """The policy's outcome on a run: 'rules' (those set), 'checked' (the rules applied, by name), 'passed', and
    'failures', one {'rule', 'reason'} per rule that failed, the reason one line naming what failed it."""
    table = table or glance(summary)
    judged = [r for r in table["rows"] if not r["attack"]["is_control"]
              and (not policy.attacks or r["arm"][1] in policy.attacks)]
    checked = ([] if policy.allow_errors else ["errors"]) + (
        [f"undetected_at={policy.undetected_at}"] if policy.undetected_at is not None else []) + (
        [f"max_mitigated_effect={policy.max_mitigated_effect:g}"] if policy.max_mitigated_effect is not None else []) + (
        [f"max_mitigated_asr={policy.max_mitigated_asr:g}"] if policy.max_mitigated_asr is not None else [])
    failures = []
    errors = summary["errors"]
    if errors and not policy.allow_errors:
        e = errors[0]
        failures.append({"rule": "errors", "reason": (
            f"{_plural(len(errors), 'plugin error')} in this run: {e['label']}, {e['budget']}, "
            f"{_target_text(e['target'])}, {e['detector'] or e['stage']} raised {e['error'] or 'an error'}: "
            f"{e['message']}" + (f" (and {len(errors) - 1} more; see the report)" if len(errors) > 1 else ""))})
    if policy.undetected_at is not None:
        level = policy.undetected_at
        evading = []
        for r in judged:
            if r["attack"]["status"] != "succeeds":
                continue
            cell = level_cell(r["detections"], level)
            if cell["outcome"] != "caught":
                best = cell["best"]
                name, value = effect(r["attack"])
                evading.append(f"{r['label']}, {r['budget']} ({name} {ci_text(value, 2, False)}; "
                               + (f"best {best['detector']}, {PRIMARY_LABEL} {ci_text(best[PRIMARY_METRIC], 2, False)}"
                                  if best else "no detector available ran on it") + ")")
        if evading:
            failures.append({"rule": f"undetected_at={level}", "reason": (
                f"{_plural(len(evading), 'attack')} {'succeeds' if len(evading) == 1 else 'succeed'} and no detector "
                f"available with {DEFENDER_LABELS[level]} catches {'it' if len(evading) == 1 else 'them'}: "
                + "; ".join(evading))})
    for measure, bound, key in (("logodds", policy.max_mitigated_effect, "max_mitigated_effect"),
                                ("asr", policy.max_mitigated_asr, "max_mitigated_asr")):
        if bound is not None:
            failures += _mitigated_above(summary, policy, measure, bound, f"{key}={bound:g}")
    return {"rules": policy.rules(), "checked": checked, "passed": not failures, "failures": failures}


def _mitigated_above(summary: dict, policy: PolicyConfig, measure: str, bound: float, rule: str) -> list[dict]:
    """The rule that no attack judged on `measure` (logodds: targeted arms, asr: backdoors) keeps a mean effect above
    `bound` under a mitigation, each at its largest budget; a run with no such attack under a mitigation fails it."""
    by_mitigation: dict[str, list[dict]] = defaultdict(list)
    for m in summary["mitigations"]:
        if (m["measure"] == measure and m["arm"][1] not in RANDOM_CONTROLS
                and (not policy.attacks or m["arm"][1] in policy.attacks)):
            by_mitigation[m["mitigation"]].append(m)
    what = "backdoor" if measure == "asr" else "attack"
    if not by_mitigation:
        return [{"rule": rule, "reason": f"no {what} was retrained under a mitigation in this run, so the effect "
                                         "under one cannot be checked (add a mitigations: section)"}]
    above = [m for rows in by_mitigation.values() for m in largest_budgets(rows)
             if effect(m)[1]["mean"] is not None and effect(m)[1]["mean"] > bound]
    if not above:
        return []
    return [{"rule": rule, "reason": (
        f"{_plural(len(above), what)} keep{'s' if len(above) == 1 else ''} a mean {effect(above[0])[0]} above "
        f"{bound:g} under a mitigation: " + "; ".join(
            f"{m['label']}, {m['budget']} under {m['mitigation']}: {ci_text(effect(m)[1], 2, False)}" for m in above))}]


# --------------------------------------------------------------------------- verdict.json
def _interval(summary: dict) -> dict:
    """A mean_ci or a Wilson rate as the schema's interval: value, lo, hi, n."""
    value = summary.get("mean", summary.get("rate"))
    return {"value": value, "lo": summary.get("lo"), "hi": summary.get("hi"), "n": summary.get("n", 0)}


def _attack_entry(a: dict) -> dict:
    record = a["records"][0]
    control = a["control"]
    return {
        "dataset": a["arm"][0], "attack": a["arm"][1], "variant": a["arm"][2], "label": a["label"],
        "budget": record.budget or {}, "budget_label": a["budget"], "n": a["n"], "control": a["is_control"],
        "status": a["status"], "succeeds": a["status"] == "succeeds" if a["status"] != "too few targets" else None,
        "delta_logodds": _interval(a["delta_logodds"]), "delta_p": _interval(a["delta_p"]),
        "flips": {"k": a["flip"]["k"], **_interval(a["flip"])}, "measure": a["measure"],
        **({"delta_asr": _interval(a["delta_asr"]), "asr": _interval(a["asr"]), "asr_control": _interval(a["asr_control"])}
           if a["measure"] == "asr" else {}),
        "versus_control": None if control is None else {
            "control": control["label"], "difference": _interval(control["diff"]), "wins": control["wins"],
            "n": control["n"], "p_wilcoxon": control["p_wilcoxon"]},
    }


def _level_entry(level: dict, table: dict) -> dict:
    best = level["best"]
    return {
        "level": level["level"], "has": level["has"], "detectors": level["detectors"],
        "best": None if best is None else {"detector": best["detector"], "knowledge": best["knowledge"],
                                           "tpr_at_1fpr": best["mean_tpr"], "attacks": best["attacks"]},
        "basis": level["basis"],
        "attacks": [{"label": r["label"], "budget_label": r["budget"], "status": r["attack"]["status"],
                     "outcome": r["cells"][level["level"]]["outcome"],
                     "caught_by": [d["detector"] for d in r["cells"][level["level"]]["caught_by"]],
                     "best": None if (b := r["cells"][level["level"]]["best"]) is None else {
                         "detector": b["detector"], "tpr_at_1fpr": _interval(b[PRIMARY_METRIC])}}
                    for r in table["rows"] if not r["attack"]["is_control"]],
    }


def _mitigation_entries(summary: dict) -> list[dict]:
    by_mitigation: dict[str, list[dict]] = defaultdict(list)
    for m in summary["mitigations"]:
        by_mitigation[m["mitigation"]].append(m)
    return [{"mitigation": name, "accuracy_cost": _interval(summary["mitigation_costs"][name]["acc_cost"]),
             "attacks": [{"label": m["label"], "budget_label": m["budget"], "status": m["status"],
                          "neutralised": m["status"] == "neutralised", "delta_logodds": _interval(m["delta_logodds"]),
                          "unmitigated": _interval(m["unmitigated"]), "measure": m["measure"],
                          **({"delta_asr": _interval(m["delta_asr"]), "unmitigated_asr": _interval(m["unmitigated_asr"])}
                             if m["measure"] == "asr" else {})} for m in rows]}
            for name, rows in sorted(by_mitigation.items())]


def verdict_document(summary: dict, policy: PolicyConfig, run: dict) -> dict:
    """verdict.json's content (schema: SCHEMA_PATH): per attack and budget, success with its CI, flips and the
    comparison with its random-edit control; per level of the defender's knowledge, the best detector, its TPR at
    1% FPR and each attack caught or evading; per mitigation, each attack neutralised or not; the plugin errors;
    the policy's outcome. `run` describes the run (directory, counts)."""
    table = glance(summary)
    return {
        "schema": "infusion-audit/verdict", "version": VERDICT_VERSION, "run": run,
        "rules": {"success": SUCCESS_RULE, "catch": CATCH_RULE, "neutralise": NEUTRALISE_RULE, "control": CONTROL_RULE,
                  **({"backdoor": BACKDOOR_RULE, "backdoor_neutralise": BACKDOOR_NEUTRALISE_RULE}
                     if any(a["measure"] == "asr" for a in summary["attacks"]) else {})},
        "attacks": [_attack_entry(a) for a in summary["attacks"]],
        "levels": [_level_entry(level, table) for level in table["levels"]],
        "mitigations": _mitigation_entries(summary),
        "errors": summary["errors"],
        "policy": evaluate_policy(policy, summary, table),
    }


def write_verdict(run_dir: str | Path, policy: PolicyConfig | None = None) -> tuple[Path, dict]:
    """Write run_dir/verdict.json from the run's records, judged by `policy` (default: the run's own, see
    run_policy); returns its path and content."""
    run_dir = Path(run_dir)
    summary = summarise(load_records(run_dir))
    run = {"directory": run_dir.resolve().name, "infusion_audit": __version__,
           "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "records": summary["counts"], "cells": summary["cells"], "targets": summary["targets"]}
    document = verdict_document(summary, policy or run_policy(run_dir), run)
    return write_json(run_dir / "verdict.json", document), document
