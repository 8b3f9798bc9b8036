"""Turn a run directory into one self-contained HTML audit report, verdict first.

Every figure on the page is computed here from `results.jsonl` (attack, detection and defence
records) with `infusion_audit.statistics`; the template only lays them out. Partial runs (no detection
or defence records yet, one target) render with what is there and say what is missing.
"""

from __future__ import annotations

import argparse
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
from typing import Any, Iterable

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from infusion_audit.version import __version__
from infusion_audit.errors import DataError, UserError
from infusion_audit.io import atomic_write_text, read_jsonl
from infusion_audit.statistics import fmt_ci, mean_ci, paired_test, wilson

from . import charts

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
PRIMARY_METRIC = "tpr_at_1fpr"
PRIMARY_LABEL = "TPR at 1% FPR"
CATCH_RATE = 0.5  # mean TPR at 1% FPR from which a detector is said to catch an attack
PARTLY_RATE = 0.1
EFFECT_LABEL = "Δ log-odds"
SUCCESS_RULE = ("an attack succeeds when the 95% t-interval of its mean Δ log-odds over runs lies entirely above 0; "
                "Δ log-odds is the log-odds of the target under the model retrained on the poisoned set minus its "
                "log-odds under a clean control retrained the same way. The mean Δp (the same difference in "
                "p(target)) is shown beside it: where p(target) under the control is tiny, Δp stays near 0 even "
                "when the attack multiplies p(target) many times")
LOGODDS_DEFINITIONS = {  # what `delta_logodds` measures in each domain's attack records
    "image": "for an image classifier, log-odds = log p(target class | target image) − log(1 − p(target class))",
    "text": "for a text model, log-odds = the mean over the probe prompts of log p(target completion) − "
            "log p(correct completion)",
}
CATCH_RULE = (f"a detector catches an attack when its mean {PRIMARY_LABEL} is at least {CATCH_RATE:.0%}, "
              f"partly catches it from {PARTLY_RATE:.0%}, and misses it below")
DETECTION_METRICS = [("auroc", "AUROC"), ("auprc", "AUPRC"), ("tpr_at_1fpr", "TPR@1%FPR"),
                     ("tpr_at_5fpr", "TPR@5%FPR"), ("recall_at_k", "recall@k")]
GALLERY_DOCS = 3
ROC_GRID = np.concatenate([np.linspace(0, 0.05, 26), np.linspace(0.05, 1, 96)[1:]])


# --------------------------------------------------------------------------- loading
def _budget_key(budget: dict | None) -> tuple:
    b = budget or {}
    return (b.get("k") or 0, b.get("eps") if b.get("eps") is not None else -1.0, str(b.get("norm")),
            bool(b.get("quantize")))


def bound_label(budget: dict | None) -> str:
    """'L∞ ε=0.25', '≤2 tokens per document' for text edits, or '' for attacks without a perturbation bound."""
    b = budget or {}
    if b.get("eps") is None:
        return f"≤{b['tokens']} tokens per document" if b.get("tokens") is not None else ""
    return {"linf": "L∞ ", "l2": "L2 "}.get(b.get("norm"), "") + f"ε={b['eps']:g}"


def budget_label(budget: dict | None) -> str:
    """'k=14, L∞ ε=0.25' from a budget record."""
    b = budget or {}
    parts = ([f"k={b['k']}"] if b.get("k") is not None else []) + [bound_label(b)]
    return ", ".join(p for p in parts if p) or "default"


def _require(record: dict, keys: Iterable[str], line: int, path: Path) -> None:
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise DataError(f"{path}: record {line} ({record.get('kind')}) lacks {', '.join(missing)}")


def load_records(run_dir: Path) -> dict[str, list[dict]]:
    """Records of results.jsonl split by kind, checked for the fields the report cannot do without."""
    path = run_dir / "results.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir}: no results.jsonl here; is this a run directory written by `infusion-audit bench`?")
    by_kind: dict[str, list[dict]] = {"attack": [], "detection": [], "defence": [], "skip": [], "mitigation": []}
    needs = {"attack": ["attack", "budget", "delta_p", "delta_logodds"],
             "mitigation": ["attack", "budget", "cell", "mitigation", "delta_logodds"],
             "detection": ["attack", "budget", "detector", "cell"], "skip": ["detector", "reason"],
             "defence": ["attack", "budget", "detector", "cell", "delta_p_after", "acc_after", "acc_control"]}
    for i, record in enumerate(read_jsonl(path), start=1):
        kind = record.get("kind") if isinstance(record, dict) else None
        if kind not in by_kind:
            log.warning("%s: record %d has unknown kind %r; skipped", path, i, kind)
            continue
        _require(record, needs[kind], i, path)
        by_kind[kind].append(record)
    return by_kind


def _read_optional_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON") from None


# --------------------------------------------------------------------------- summaries
class Arms:
    """Names an attack arm (scenario, attack, variant) for display; the scenario only when there are several."""

    def __init__(self, records: list[dict]):
        self.many_scenarios = len({r.get("scenario") for r in records}) > 1

    @staticmethod
    def key(r: dict) -> tuple:
        return (str(r.get("scenario", "")), str(r["attack"]), str(r.get("variant") or ""))

    def label(self, key: tuple) -> str:
        scenario, attack, variant = key
        text = f"{attack} ({variant})" if variant else attack
        return f"{scenario}: {text}" if self.many_scenarios else text


def _group(records: list[dict], extra: str | None = None) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        key = Arms.key(r) + (_budget_key(r["budget"]),) + ((str(r[extra]),) if extra else ())
        groups[key].append(r)
    return dict(sorted(groups.items()))


def _values(records: list[dict], field: str) -> list[float]:
    return [float(r[field]) for r in records if r.get(field) is not None]


def _rate(records: list[dict], test) -> dict:
    return wilson(sum(1 for r in records if test(r)), len(records))


def attack_status(delta_logodds: dict) -> str:
    if delta_logodds["n"] < 2 or delta_logodds["lo"] is None:
        return "too few targets"
    return "succeeds" if delta_logodds["lo"] > 0 else "no effect shown"


def summarise_attacks(records: list[dict], arms: Arms) -> list[dict]:
    rows = []
    for key, group in _group(records).items():
        arm, budget = key[:3], group[0]["budget"]
        delta_logodds = mean_ci(_values(group, "delta_logodds"))
        acc_drop = mean_ci([r["acc_control"] - r["acc_poisoned"] for r in group
                            if r.get("acc_control") is not None and r.get("acc_poisoned") is not None])
        norms = [r.get("norms") or {} for r in group]
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(budget), "budget_key": key[3],
            "n": len(group), "delta_logodds": delta_logodds, "status": attack_status(delta_logodds),
            "delta_p": mean_ci(_values(group, "delta_p")),
            "success": _rate(group, lambda r: r["delta_logodds"] > 0),
            "success_p": _rate(group, lambda r: r["delta_p"] > 0),
            "flip": _rate(group, lambda r: bool(r.get("flip"))),
            "top1": _rate(group, lambda r: bool(r.get("top1_poisoned"))),
            "top1_control": _rate(group, lambda r: bool(r.get("top1_control"))),
            "p_control": mean_ci(_values(group, "p_control")),
            "p_poisoned": mean_ci(_values(group, "p_poisoned")),
            "acc_drop": acc_drop,
            "linf": mean_ci([n["linf"] for n in norms if n.get("linf") is not None]),
            "l2": mean_ci([n["l2"] for n in norms if n.get("l2") is not None]),
            "values_changed": mean_ci([n["values_changed"] for n in norms if n.get("values_changed") is not None]),
            "off_grid": sum(int(n.get("off_grid") or 0) for n in norms),
            "out_of_range": sum(int(n.get("out_of_range") or 0) for n in norms),
            "records": group,
        })
    return rows


def _metric_summary(group: list[dict], metric: str) -> dict:
    """Mean over cells with a t-interval; with one cell, that cell's own bootstrap CI over documents."""
    cells = [r[metric] for r in group if isinstance(r.get(metric), dict) and r[metric].get("value") is not None]
    summary = mean_ci([c["value"] for c in cells])
    if len(cells) == 1:
        summary.update(lo=cells[0].get("lo"), hi=cells[0].get("hi"))
    if summary["lo"] is not None:  # every detection metric is a rate: its interval ends at 0 and 1
        summary.update(lo=max(0.0, summary["lo"]), hi=min(1.0, summary["hi"]))
    return summary


def _mean_roc(group: list[dict]) -> tuple[list[float], list[float]] | None:
    """Vertical average of the cells' ROC curves on a common FPR grid."""
    curves = [r["roc"] for r in group if isinstance(r.get("roc"), dict) and len(r["roc"].get("fpr") or []) >= 2]
    if not curves:
        return None
    tprs = [np.interp(ROC_GRID, np.asarray(c["fpr"], float), np.asarray(c["tpr"], float)) for c in curves]
    return ROC_GRID.tolist(), np.mean(tprs, axis=0).tolist()


def detection_status(summary: dict) -> str:
    value = summary.get("mean")
    if value is None:
        return "n/a"
    return "caught" if value >= CATCH_RATE else "partly caught" if value >= PARTLY_RATE else "missed"


def summarise_detection(records: list[dict], arms: Arms) -> list[dict]:
    rows = []
    for key, group in _group(records, extra="detector").items():
        arm = key[:3]
        metrics = {m: _metric_summary(group, m) for m, _ in DETECTION_METRICS}
        unedited = {m: _metric_summary(group, f"{m}_unedited") for m, _ in DETECTION_METRICS
                    if any(f"{m}_unedited" in r for r in group)}
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(group[0]["budget"]), "budget_key": key[3],
            "detector": key[4], "knowledge": group[0].get("knowledge", "?"), "n": len(group), "metrics": metrics,
            "status": detection_status(metrics[PRIMARY_METRIC]), "unedited": unedited,
            "flag_precision": mean_ci(_values(group, "flag_precision")),
            "flag_recall": mean_ci(_values(group, "flag_recall")),
            "flagged": mean_ci(_values(group, "flagged")),
            "seconds": mean_ci(_values(group, "seconds")),
            "roc": _mean_roc(group),
        })
    return rows


def defence_measure(records: list[dict]) -> str:
    """The attack field the defence figures compare: delta_logodds when every defence record carries
    delta_logodds_after, else delta_p (runs written before the bench recorded log-odds), never a mix."""
    if all(r.get("delta_logodds_after") is not None for r in records):
        return "delta_logodds"
    log.warning("defence records without delta_logodds_after: the defence figures use Δp")
    return "delta_p"


def summarise_defence(records: list[dict], attacks: list[dict], arms: Arms, measure: str) -> list[dict]:
    """Residual effect after removing a detector's flags, on `measure` (see defence_measure), paired by cell."""
    delta_by_cell = {r["cell"]: r[measure] for a in attacks for r in a["records"] if "cell" in r}
    after_field = f"{measure}_after"
    rows = []
    for key, group in _group(records, extra="detector").items():
        arm = key[:3]
        paired = [(delta_by_cell[r["cell"]], r[after_field]) for r in group if r["cell"] in delta_by_cell]
        reduction = paired_test([b for b, _ in paired], [a for _, a in paired]) if paired else None
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(group[0]["budget"]), "budget_key": key[3],
            "detector": key[4], "n": len(group),
            "before": mean_ci([b for b, _ in paired]),
            "after": mean_ci(_values(group, after_field)),
            "after_p": mean_ci(_values(group, "delta_p_after")),
            "residual_success": _rate(group, lambda r: r[after_field] > 0),
            "reduction": reduction,
            "cost": mean_ci([r["acc_control"] - r["acc_after"] for r in group]),
            # the removal's own price, the attack aside: the clean control with the same documents removed
            "cost_clean": mean_ci([r["acc_control"] - r["acc_control_removed"] for r in group
                                   if r.get("acc_control_removed") is not None]),
            "removed": mean_ci(_values(group, "removed")),
            "removed_poisons": mean_ci(_values(group, "removed_poisons")),
        })
    return rows


NEUTRAL_BOUND = 0.1  # nats of Δ log-odds under which a mitigated effect counts as neutralised
NEUTRALISE_RULE = (f"a mitigation neutralises an attack when the attack succeeds without it on the same runs and the "
                   f"95% t-interval of its mean {EFFECT_LABEL} under the mitigation (against a clean control trained "
                   f"under the same mitigation) lies entirely below {NEUTRAL_BOUND:g}, i.e. the poison is shown to "
                   f"multiply the odds of the target by less than e^{NEUTRAL_BOUND:g} ≈ "
                   f"{math.exp(NEUTRAL_BOUND):.3f}; "
                   "the attack still succeeds under it when that interval lies entirely above 0 (the success rule); "
                   f"anything between is inconclusive: no effect shown, but one of {NEUTRAL_BOUND:g} or more not "
                   "ruled out")


def mitigation_status(unmitigated: dict, mitigated: dict) -> str:
    """The verdict on one attack under one mitigation, by NEUTRALISE_RULE."""
    if "too few targets" in (attack_status(unmitigated), attack_status(mitigated)):
        return "too few targets"
    if attack_status(unmitigated) != "succeeds":
        return "nothing to stop"
    if mitigated["hi"] < NEUTRAL_BOUND:
        return "neutralised"
    return "still succeeds" if mitigated["lo"] > 0 else "inconclusive"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figure(records: list[dict], name: str) -> list[float]:
    """A mitigation figure's numeric values over records (a figure is optional, and a non-number is ignored)."""
    return [float(f[name]) for r in records if _number((f := r.get("figures") or {}).get(name))]


def _per_control(records: list[dict], value) -> dict:
    """mean_ci of value(record) over distinct clean controls (scenario, victim, seed, mitigation): runs that share
    a control share its accuracy, so they are one observation, not many."""
    by_control: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if (v := value(r)) is not None:
            by_control[tuple(str(r.get(k)) for k in ("scenario", "victim", "seed", "mitigation"))].append(v)
    return mean_ci([float(np.mean(v)) for v in by_control.values()])


def _accuracy_cost(r: dict) -> float | None:
    """The clean accuracy a mitigation costs: plain clean control minus the clean control trained under it."""
    if _number(r.get("acc_unmitigated")) and _number(r.get("acc_control")):
        return r["acc_unmitigated"] - r["acc_control"]
    return None


def _time_factors(records: list[dict]) -> list[float]:
    """Per run: the mitigated retrain's seconds over the plain retrain's of the same cell."""
    out = []
    for r in records:
        t = r.get("timings") or {}
        if _number(t.get("retrain")) and _number(t.get("retrain_unmitigated")) and t["retrain_unmitigated"] > 0:
            out.append(t["retrain"] / t["retrain_unmitigated"])
    return out


def _certified(records: list[dict]) -> dict:
    """Share of runs whose poisoned-document count k is within the target's certified edit radius (Wilson)."""
    pairs = [(r["budget"].get("k"), f["certified_radius_edit"]) for r in records
             if _number((f := r.get("figures") or {}).get("certified_radius_edit")) and _number(r["budget"].get("k"))]
    return wilson(sum(1 for k, radius in pairs if k <= radius), len(pairs))


def summarise_mitigations(records: list[dict], attacks: list[dict], arms: Arms) -> list[dict]:
    """Per mitigation and attack arm x budget: the effect under the mitigation (against a clean control trained
    under it), paired by cell and victim with the plain effect of the same runs (`attacks`: summarise_attacks'
    rows), and what the mitigation costs in clean accuracy and training time, beside its own figures."""
    plain = {(r["cell"], r.get("victim")): r["delta_logodds"] for a in attacks for r in a["records"] if "cell" in r}
    rows = []
    for key, group in _group(records, extra="mitigation").items():
        arm = key[:3]
        paired = [(plain[c], r["delta_logodds"]) for r in group if (c := (r["cell"], r.get("victim"))) in plain]
        unmitigated, mitigated = mean_ci([b for b, _ in paired]), mean_ci(_values(group, "delta_logodds"))
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(group[0]["budget"]), "budget_key": key[3],
            "mitigation": key[4], "n": len(group), "delta_logodds": mitigated, "unmitigated": unmitigated,
            "status": mitigation_status(unmitigated, mitigated),
            "reduction": paired_test([b for b, _ in paired], [a for _, a in paired]) if paired else None,
            "flip": _rate(group, lambda r: bool(r.get("flip"))),
            "acc_cost": _per_control(group, _accuracy_cost), "time_factor": mean_ci(_time_factors(group)),
            "epsilon": mean_ci(_figure(group, "epsilon")), "delta": sorted(set(_figure(group, "delta"))),
            "epsilon_covers": sorted({str(f["epsilon_covers"]) for r in group
                                      if (f := r.get("figures") or {}).get("epsilon_covers") is not None}),
            "clipped_fraction": mean_ci(_figure(group, "clipped_fraction")),
            "parts": sorted({int(v) for v in _figure(group, "parts")}),
            "radius": mean_ci(_figure(group, "certified_radius_edit")), "certified": _certified(group),
            "records": group,
        })
    return sorted(rows, key=lambda r: (r["mitigation"], r["arm"], r["budget_key"]))


def summarise_run(records: dict[str, list[dict]]) -> dict:
    """Every per-arm summary of a run's records (by kind): 'attacks', 'detection', 'defence', 'mitigations' (the
    attacks under each mitigation) and the 'defence_measure' the defence rows compare (see defence_measure)."""
    arms = Arms(records["attack"])
    attacks = summarise_attacks(records["attack"], arms)
    measure = defence_measure(records["defence"])
    return {"attacks": attacks, "detection": summarise_detection(records["detection"], arms),
            "defence": summarise_defence(records["defence"], attacks, arms, measure), "defence_measure": measure,
            "mitigations": summarise_mitigations(records.get("mitigation", []), attacks, arms)}


def summarise_not_run(records: list[dict]) -> list[dict]:
    """Each distinct reason a detector did not run (a 'skip' record per cell), with how many runs it held for."""
    counts: dict[tuple, int] = defaultdict(int)
    for r in records:
        counts[(str(r["detector"]), str(r["reason"]))] += 1
    return [{"detector": d, "reason": reason, "n": n} for (d, reason), n in sorted(counts.items())]


def judge_mitigations(mitigations: list[dict]) -> list[dict]:
    """Per mitigation (summarise_mitigations' rows), each attack at its largest budget under it sorted by
    NEUTRALISE_RULE, with what the mitigation costs over all its runs: clean accuracy, time, certified runs."""
    by_mitigation: dict[str, list[dict]] = defaultdict(list)
    for m in mitigations:
        by_mitigation[m["mitigation"]].append(m)
    out = []
    for name, rows in by_mitigation.items():
        top = sorted(_largest_budgets(rows), key=lambda m: m["label"])
        records = [r for m in rows for r in m["records"]]
        out.append({"mitigation": name, **{status.replace(" ", "_"): [m for m in top if m["status"] == status]
                                           for status in ("neutralised", "still succeeds", "inconclusive",
                                                          "too few targets", "nothing to stop")},
                    "acc_cost": _per_control(records, _accuracy_cost), "time_factor": mean_ci(_time_factors(records)),
                    "certified": _certified(records), "epsilon": mean_ci(_figure(records, "epsilon"))})
    return out


def build_verdict(attacks: list[dict], detection: list[dict], defence: list[dict],
                  mitigations: list[dict] = ()) -> dict:
    """One row per attack arm at its largest budget: does it work, who catches it, what removal costs; and
    per mitigation, which attacks it neutralises and at what cost (see judge_mitigations)."""
    rows = []
    by_arm: dict[tuple, list[dict]] = defaultdict(list)
    for a in attacks:
        by_arm[a["arm"]].append(a)
    for arm, budgets in by_arm.items():
        top = max(budgets, key=lambda a: a["budget_key"])
        dets = sorted((d for d in detection if d["arm"] == arm and d["budget_key"] == top["budget_key"]),
                      key=lambda d: -(d["metrics"][PRIMARY_METRIC]["mean"] or 0))
        defs = {d["detector"]: d for d in defence if d["arm"] == arm and d["budget_key"] == top["budget_key"]}
        best = dets[0] if dets else None
        best_defence = defs.get(best["detector"]) if best else None
        rows.append({
            "label": top["label"], "budget": top["budget"], "attack": top, "status": top["status"],
            "caught_by": [d for d in dets if d["status"] == "caught"], "n_detectors": len(dets), "best": best,
            "defence": best_defence,
        })
    rows.sort(key=lambda r: (r["status"] != "succeeds", -(r["attack"]["delta_logodds"]["mean"] or 0)))
    succeeding = [r for r in rows if r["status"] == "succeeds"]
    return {"rows": rows, "succeeding": succeeding,
            "inconclusive": [r for r in rows if r["status"] == "too few targets"],
            "has_detection": bool(detection), "has_defence": bool(defence),
            "mitigations": judge_mitigations(list(mitigations))}


# --------------------------------------------------------------------------- the adaptive attacker
KNOWLEDGE_LEVELS = {  # what the defender has, from least to most; a detector record's `knowledge`
    "data": "the data alone", "model": "a model trained on the data",
    "probe": "a model and held-out probe inputs", "reference": "a trusted reference copy of the data",
    "forensic": "the suspicious behaviour (forensic)"}
ADAPTIVE_ATTACK = "infusion-evasive"
SURVIVAL_RULE = (f"a detector's catch survives the adaptive attacker when its mean {PRIMARY_LABEL} is at least "
                 f"{CATCH_RATE:.0%} against every detector-aware arm that still succeeds (the attacker picks the "
                 "setting that suits it)")


def knowledge_order(level: str) -> tuple:
    return (list(KNOWLEDGE_LEVELS).index(level) if level in KNOWLEDGE_LEVELS else len(KNOWLEDGE_LEVELS), level)


def stealth_key(attack: dict) -> tuple:
    """How far an Infusion arm goes to hide: detectors evaded, how low the quantile it stays under, λ."""
    params = attack["records"][0].get("params") or {}
    evade = params.get("evade") or []
    hides = bool(evade) or bool(params.get("stealth"))
    quantile = -float(params.get("evade_quantile", 1.0)) if hides else -1.0
    return (len(evade), quantile, float(params.get("stealth") or 0))


def detectors_by_level(detection: list[dict]) -> dict[str, list[str]]:
    """Detector names by the knowledge they used, from least to most (data, model, ..., forensic)."""
    levels: dict[str, list[str]] = defaultdict(list)
    for d in detection:
        if d["detector"] not in levels[d["knowledge"]]:
            levels[d["knowledge"]].append(d["detector"])
    return {level: sorted(levels[level]) for level in sorted(levels, key=knowledge_order)}


def _largest_budgets(attacks: list[dict]) -> list[dict]:
    """Each arm at its largest budget (the verdict's view; the tables have every budget)."""
    top: dict[tuple, dict] = {}
    for a in attacks:
        if a["arm"] not in top or a["budget_key"] > top[a["arm"]]["budget_key"]:
            top[a["arm"]] = a
    return list(top.values())


def build_frontier(attacks: list[dict], detection: list[dict]) -> dict | None:
    """What an attacker who knows the detectors can still do: per detector, the Infusion arms (plain, then
    detector-aware ones by growing stealth) as points of success against detection. None without an
    adaptive arm. Plain arms are Infusion's with the adaptive arms' storage and selection."""
    adaptive = [a for a in _largest_budgets(attacks) if a["arm"][1] == ADAPTIVE_ATTACK]
    if not adaptive:
        return None
    shared = {(p.get("quantize"), p.get("selection")) for a in adaptive if (p := a["records"][0].get("params") or {})}
    plain = [a for a in _largest_budgets(attacks) if a["arm"][1] == "infusion"
             and ((p := a["records"][0].get("params") or {}).get("quantize"), p.get("selection")) in shared]
    arms = sorted(plain + adaptive, key=stealth_key)
    by_key = {(d["arm"], d["budget_key"], d["detector"]): d for d in detection}
    panels = []
    for knowledge, names in detectors_by_level(detection).items():
        for name in names:
            points = [{"number": i + 1, "success": a["delta_logodds"], "succeeds": a["status"] == "succeeds",
                       "detection": d["metrics"][PRIMARY_METRIC]}
                      for i, a in enumerate(arms) if (d := by_key.get((a["arm"], a["budget_key"], name)))]
            if points:
                panels.append({"detector": name, "knowledge": knowledge, "points": points})
    return {"arms": [{"number": i + 1, "label": a["label"], "budget": a["budget"], "effect": a["delta_logodds"],
                      "status": a["status"]} for i, a in enumerate(arms)], "panels": panels}


def build_defender_levels(attacks: list[dict], detection: list[dict]) -> list[dict]:
    """The verdict by what the defender has: at each knowledge level, the detector with the highest mean
    TPR at 1% FPR against the attacks that succeed and ignore it, and its worst TPR against the
    detector-aware arms that still succeed. When no attack succeeds (a run too small to show it), every
    attack counts, and each level says so (`all_attacks`)."""
    largest = _largest_budgets(attacks)
    succeeding = [a for a in largest if a["status"] == "succeeds"]
    top = {(a["arm"], a["budget_key"]): a for a in (succeeding or largest)}
    naive_rows, adaptive_rows = defaultdict(list), defaultdict(list)
    for d in detection:
        attack = top.get((d["arm"], d["budget_key"]))
        if attack is not None and d["metrics"][PRIMARY_METRIC]["mean"] is not None:
            (adaptive_rows if d["arm"][1] == ADAPTIVE_ATTACK else naive_rows)[d["detector"]].append(d)
    out = []
    for level, names in detectors_by_level(detection).items():
        scored = [(float(np.mean([d["metrics"][PRIMARY_METRIC]["mean"] for d in naive_rows[name]])), name)
                  for name in names if naive_rows[name]]
        if not scored:
            out.append({"level": level, "has": KNOWLEDGE_LEVELS.get(level, level), "best": None,
                        "all_attacks": not succeeding})
            continue
        naive_tpr, best = max(scored)
        worst = min(adaptive_rows[best], key=lambda d: d["metrics"][PRIMARY_METRIC]["mean"], default=None)
        out.append({"level": level, "has": KNOWLEDGE_LEVELS.get(level, level), "best": best, "naive_tpr": naive_tpr,
                    "naive_arms": len(naive_rows[best]), "worst": worst,
                    "worst_attack": top[(worst["arm"], worst["budget_key"])] if worst else None,
                    "survives": None if worst is None else worst["metrics"][PRIMARY_METRIC]["mean"] >= CATCH_RATE,
                    "all_attacks": not succeeding})
    return out


def headline_level(levels: list[dict]) -> dict | None:
    """The defender's headline: the best catch with a model at most (no trusted copy, no behaviour needed)."""
    candidates = [lv for lv in levels if lv["best"] and lv["level"] in ("data", "model")]
    return max(candidates, key=lambda lv: lv["naive_tpr"], default=None)


# --------------------------------------------------------------------------- charts
def build_charts(attacks: list[dict], detection: list[dict], defence: list[dict], defence_label: str,
                 frontier: dict | None = None, mitigations: list[dict] = ()) -> dict:
    out: dict[str, Any] = dict.fromkeys(("budget", "scatter", "frontier", "roc", "defence", "hardening"))
    if mitigations:
        out["hardening"] = charts.hardening(_hardening_panels(attacks, list(mitigations), defence, defence_label),
                                            HARDENING_KINDS, NEUTRAL_BOUND, EFFECT_LABEL)
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
    largest = {a["arm"]: a["budget_key"] for a in _largest_budgets(attacks)}
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
    and the residual effect after each detector's removal, each at the clean accuracy it costs (in points)."""
    plain = {(a["arm"], a["budget_key"]): a for a in attacks}
    removal = [d for d in defence if defence_label == EFFECT_LABEL]  # a residual Δp does not sit on a Δ log-odds axis
    cost = removal_cost(removal)
    panels = []
    for top in sorted(_largest_budgets(mitigations), key=lambda m: m["label"]):
        key = (top["arm"], top["budget_key"])
        points = [{"kind": "none", "name": "no defence", "cost": {"mean": 0.0}, "effect": plain[key]["delta_logodds"]}
                  ] if key in plain else []
        points += [{"kind": "mitigation", "name": m["mitigation"], "cost": _in_points(m["acc_cost"]),
                    "effect": m["delta_logodds"]} for m in mitigations if (m["arm"], m["budget_key"]) == key]
        points += [{"kind": "removal", "name": f"remove {d['detector']}", "cost": _in_points(d[cost]),
                    "effect": d["after"]} for d in removal if (d["arm"], d["budget_key"]) == key]
        panels.append({"title": f"{top['label']}, {top['budget']}", "points": points})
    return panels


HARDENING_KINDS = {"none": ("no defence", "o", "firebrick"),
                   "mitigation": ("trained under a mitigation", "s", "slateblue"),
                   "removal": ("a detector's flags removed, retrained", "D", "seagreen")}


def _knowledge_panels(attacks: list[dict], detection: list[dict]) -> list[dict]:
    """The detection chart's panels: per knowledge level, each attack at its largest budget (succeeding
    ones first, by effect) against every detector of that level, with the unedited null where measured."""
    arms = sorted(_largest_budgets(attacks),
                  key=lambda a: (a["status"] != "succeeds", -(a["delta_logodds"]["mean"] or 0), a["label"]))
    by_key = {(d["arm"], d["budget_key"], d["detector"]): d for d in detection}
    labels = [f"{a['label']} · {EFFECT_LABEL} {_num(a['delta_logodds']['mean'], 2)}" for a in arms]
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
    ks = [[a["records"][0]["budget"].get("k") for a in rows] for rows in by_arm.values()]
    bounds = [{bound_label(a["records"][0]["budget"]) for a in rows} for rows in by_arm.values()]
    if all(None not in k and len(set(k)) == len(k) for k in ks) and all(len(b) == 1 for b in bounds):
        series = {rows[0]["label"] + (f", {b}" if (b := bound_label(rows[0]["records"][0]["budget"])) else ""):
                  [(str(a["records"][0]["budget"]["k"]), a["delta_logodds"]) for a in rows]
                  for rows in by_arm.values()}
        ticks = [str(k) for k in sorted({k for arm_ks in ks for k in arm_ks})]
        return charts.success_vs_budget(series, ticks, "poisoned documents k")
    series = {rows[0]["label"]: [(a["budget"], a["delta_logodds"]) for a in rows] for rows in by_arm.values()}
    ticks = list(dict.fromkeys(a["budget"] for a in ordered))
    return charts.success_vs_budget(series, ticks, "budget (poisoned documents k, perturbation bound ε)")


# --------------------------------------------------------------------------- gallery
def _text_diff(original: str, poisoned: str, context: int = 40) -> list[tuple[str, str]]:
    """Character-level diff as (op, text) segments, op in equal/delete/insert; long unchanged runs are elided.

    Characters, not words: a token edit inside a document without spaces (a Caesar line) shows as the
    one or two characters it changed rather than the whole document deleted and re-inserted."""
    segments = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=original, b=poisoned, autojunk=False).get_opcodes():
        if op == "equal":
            text = original[i1:i2]
            if len(text) > 2 * context + 1:
                text = text[:context] + " … " + text[-context:]
            segments.append(("equal", text))
            continue
        if op in ("delete", "replace"):
            segments.append(("delete", original[i1:i2]))
        if op in ("insert", "replace"):
            segments.append(("insert", poisoned[j1:j2]))
    return segments


def _gallery_item(run_dir: Path, attack: dict, provenance: Any) -> dict | None:
    """The first poisoned set of an attack x budget: a few documents before/after (images) or diffs (text)."""
    record = next((r for r in attack["records"] if r.get("artefact")), None)
    if record is None:
        return None
    folder = (run_dir / str(record["artefact"])).resolve()
    if not folder.is_relative_to(run_dir.resolve()):
        log.warning("artefact %s lies outside the run directory; not shown", record["artefact"])
        return None
    item = {"label": attack["label"], "budget": attack["budget"], "target": record.get("target") or {},
            "class_names": _class_names(provenance, record.get("scenario")), "docs": [], "texts": []}
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


def _timings(records: dict[str, list[dict]]) -> list[dict]:
    """Wall time by stage, summed over the records that report it."""
    stages: dict[str, list[float]] = defaultdict(list)
    for r in records["attack"]:
        for stage, seconds in (r.get("timings") or {}).items():
            if isinstance(seconds, (int, float)):
                stages[f"attack: {stage}"].append(float(seconds))
    for r in records["detection"]:
        if isinstance(r.get("seconds"), (int, float)):
            stages[f"detector: {r['detector']}"].append(float(r["seconds"]))
    for r in records.get("mitigation", []):
        for stage, seconds in (r.get("timings") or {}).items():
            if _number(seconds):
                stages[f"mitigation {r['mitigation']}: {stage}"].append(float(seconds))
    return [{"stage": s, "n": len(v), "total": sum(v), "mean": mean_ci(v)} for s, v in sorted(stages.items())]


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


def _class_names(provenance: Any, scenario: str | None) -> list[str]:
    names = provenance.get("class_names") if isinstance(provenance, dict) else None
    if isinstance(names, dict):
        names = names.get(scenario)
    return [str(n) for n in names] if isinstance(names, list) else []


# --------------------------------------------------------------------------- rendering
def _ci_text(summary: dict | None, digits: int = 3, with_n: bool = True) -> str:
    """fmt_ci's 'value [lo, hi] (n=..)', without the n where the table has its own n column; in scientific
    notation when every nonzero figure is too small for `digits` decimals (Δp of a target the control deems
    near impossible)."""
    if not summary:
        return "n/a"
    value = summary.get("mean", summary.get("value", summary.get("rate")))
    figures = [abs(v) for v in (value, summary.get("lo"), summary.get("hi")) if v is not None]
    if any(figures) and max(figures) < 0.5 * 10 ** -digits:
        text = f"{value:.2e}" + (f" [{summary['lo']:.2e}, {summary['hi']:.2e}]" if summary.get("lo") is not None
                                  else "")
        return text + (f" (n={summary['n']})" if with_n else "")
    text = fmt_ci(summary, digits=digits)
    return text if with_n else text.rsplit(" (n=", 1)[0]


def _in_points(summary: dict) -> dict:
    """An accuracy difference's summary (0..1) in percentage points."""
    return {k: (v * 100 if k in ("mean", "lo", "hi", "sd") and v is not None else v) for k, v in summary.items()}


def _num(value: float | None, digits: int = 3) -> str:
    """A figure with `digits` decimals, in scientific notation when nonzero but too small for them."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2e}" if value and abs(value) < 0.5 * 10 ** -digits else f"{value:.{digits}f}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["ci"] = _ci_text
    env.filters["points"] = lambda s, with_n=True: _ci_text(_in_points(s), 2, with_n)
    env.filters["num"] = _num
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    env.filters["classname"] = lambda c, names: f"{c} “{names[c]}”" \
        if isinstance(c, int) and 0 <= c < len(names) and names[c] != str(c) else str(c)
    return env


def render_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render run_dir/report.html (or `out`) from the run's results, config and artefacts; returns the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    records = load_records(run_dir)
    summaries = summarise_run(records)
    attacks, detection, defence = summaries["attacks"], summaries["detection"], summaries["defence"]
    mitigations = summaries["mitigations"]
    defence_label = EFFECT_LABEL if summaries["defence_measure"] == "delta_logodds" else "Δp"
    provenance = _read_optional_json(run_dir / "provenance.json")
    config_path = run_dir / "config.yaml"
    gallery = [item for a in attacks if (item := _gallery_item(run_dir, a, provenance)) is not None]
    levels, frontier = build_defender_levels(attacks, detection), build_frontier(attacks, detection)
    context = {
        "title": f"Poisoning audit: {run_dir.resolve().name}",
        "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run_dir": str(run_dir),
        "counts": {k: len(v) for k, v in records.items()},
        "targets": len({(r.get("scenario"), json.dumps(r.get("target"), sort_keys=True)) for r in records["attack"]}),
        "verdict": build_verdict(attacks, detection, defence, mitigations),
        "levels": levels, "headline": headline_level(levels), "frontier": frontier,
        "attacks": attacks, "detection": detection, "defence": defence, "mitigations": mitigations,
        "removal_cost": removal_cost(defence),
        "charts": build_charts(attacks, detection, defence, defence_label, frontier, mitigations),
        "gallery": gallery,
        "config_text": config_path.read_text(encoding="utf-8") if config_path.exists() else None,
        "provenance": _sections(provenance, "run"),
        "quality": _task_quality(provenance),
        "timings": _timings(records),
        "not_run": summarise_not_run(records["skip"]), "n_cells": len({r.get("cell") for r in records["attack"]}),
        "rules": {"success": SUCCESS_RULE, "catch": CATCH_RULE, "survival": SURVIVAL_RULE,
                  "neutralise": NEUTRALISE_RULE,
                  "logodds": [text for domain, text in LOGODDS_DEFINITIONS.items()
                              if any(r.get("domain", "image") == domain for r in records["attack"])]},
        "effect_label": EFFECT_LABEL, "defence_label": defence_label, "neutral_bound": NEUTRAL_BOUND,
        "primary_label": PRIMARY_LABEL, "metric_names": DETECTION_METRICS,
    }
    html = _environment().get_template("report.html.j2").render(**context)
    return atomic_write_text(Path(out) if out else run_dir / "report.html", html)


# --------------------------------------------------------------------------- scan report
SCAN_ROWS = 50
SCAN_COLUMNS = ("index", "label", "poisoned", "flagged_by", "flagged")


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
    table = [{"fields": {k: rows[i].get(k) for k in columns},
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
        "columns": columns, "shown": min(SCAN_ROWS, len(rows)),
        "class_names": [str(n) for n in data.get("class_names") or []],
        "detectors": detectors, "skipped": [d for d in summary.get("skipped") or [] if isinstance(d, dict)],
        "flagged_by_any": summary.get("flagged_by_any"),
        "metrics": metrics, "metric_names": DETECTION_METRICS,
        "charts": {"roc": charts.roc_curves(curves) if curves else None},
        "summary": _sections({k: v for k, v in summary.items()
                              if k not in ("detection", "detectors", "skipped", "columns") and v is not None}, "scan"),
    }
    return _environment().get_template("scan.html.j2").render(**context)


# --------------------------------------------------------------------------- CLI
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory from `bench` (results.jsonl) or `scan` (scores.csv)")
    p.add_argument("--out", type=Path, help="HTML file to write (default: RUN_DIR/report.html)")


def run_report(args: argparse.Namespace) -> int:
    is_scan = (args.run_dir / "scores.csv").exists() and not (args.run_dir / "results.jsonl").exists()
    path = (render_scan_report if is_scan else render_report)(args.run_dir, args.out)
    print(f"report written to {path}")
    return 0
