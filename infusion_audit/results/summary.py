"""The one summary of a run's records: what the `attack` command prints, `BenchResult.summaries` holds and the
report shows.

Records are grouped by arm (dataset, attack, variant; a transfer victim's records are their own variant) and
budget. Every mean comes with a 95% t-interval (`mean_ci`) and every rate with a Wilson interval, each with
its n. An attack is judged on its mean Δ log-odds by the success rule (`verdict.attack_status`); Δp and both
success rates (Δ log-odds > 0, Δp > 0) are shown beside it. Each reference arm (Infusion) is compared with
every other arm of its dataset on the (target, seed) cells both ran, an arm's repeats on a cell paired by
their mean, and set against the topline, probe insertion x k.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from ..statistics import bootstrap_ci, fmt_ci, mean_ci, paired_test, positive_mean_ci, wilson
from .records import Record
from .verdict import NEUTRAL_ASR, PRIMARY_METRIC, attack_status, detection_status, mitigation_status

log = logging.getLogger(__name__)

DETECTION_METRICS = [("auroc", "AUROC"), ("auprc", "AUPRC"), ("tpr_at_1fpr", "TPR@1%FPR"),
                     ("tpr_at_5fpr", "TPR@5%FPR"), ("recall_at_k", "recall@k")]
ROC_GRID = np.concatenate([np.linspace(0, 0.05, 26), np.linspace(0.05, 1, 96)[1:]])
REFERENCE_ATTACKS = ("infusion", "infusion-text")  # the arms compared with every other
TOPLINE = ("probe-insertion", "xk")  # (attack, variant): k copies of the target input with the target class
# random-edit controls: the attack each stands beside (it edits that attack's documents, or ones chosen by the same
# selection, at random within the same budget); a control's `like` param names another
RANDOM_CONTROLS = {"random-noise": "infusion", "random-tokens": "infusion-text"}


# --------------------------------------------------------------------------- budgets and arms
def budget_key(budget: dict | None) -> tuple:
    """A budget's place in the order of budgets: k, then the bound."""
    b = budget or {}
    return (b.get("k") or 0, b.get("eps") if b.get("eps") is not None else -1.0, str(b.get("norm")),
            bool(b.get("quantize")), str(b.get("trigger") or ""))


def bound_label(budget: dict | None) -> str:
    """'L∞ ε=0.25', '≤2 tokens per document' for text edits, or '' for attacks without a perturbation bound; a
    backdoor's trigger after it ('L∞ ε=0.25, 3×3 white patch')."""
    b = budget or {}
    if b.get("eps") is None:
        tokens = b.get("tokens")
        bound = "" if tokens is None else (f"≤{tokens} tokens per document" if tokens >= 1 else
                                           f"≤{tokens:.0%} of each document's tokens")
    else:
        bound = {"linf": "L∞ ", "l2": "L2 "}.get(b.get("norm"), "") + f"ε={b['eps']:g}"
    return ", ".join(part for part in (bound, b.get("trigger") or "") if part)


def budget_label(budget: dict | None) -> str:
    """'k=14, L∞ ε=0.25' from a budget record."""
    b = budget or {}
    parts = ([f"k={b['k']}"] if b.get("k") is not None else []) + [bound_label(b)]
    return ", ".join(p for p in parts if p) or "default"


class Arms:
    """Names an arm (dataset, attack, variant) for display: 'attack (variant)', the dataset first only when
    the run has several."""

    def __init__(self, records: list[Record]):
        self.many_datasets = len({r.dataset for r in records}) > 1

    @staticmethod
    def key(r: Record) -> tuple:
        return (str(r.dataset or ""), str(r.attack), str(r.variant or ""))

    def label(self, key: tuple) -> str:
        dataset, attack, variant = key
        text = f"{attack} ({variant})" if variant else attack
        return f"{dataset}: {text}" if self.many_datasets else text


def _group(records: list[Record], extra: str | None = None) -> dict[tuple, list[Record]]:
    """Records by arm and budget (and the `extra` field: detector, mitigation), in order."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        key = Arms.key(r) + (budget_key(r.budget),) + ((str(getattr(r, extra)),) if extra else ())
        groups[key].append(r)
    return dict(sorted(groups.items()))


def _values(records: list[Record], name: str) -> list[float]:
    return [float(v) for r in records if (v := getattr(r, name)) is not None]


def _rate(records: list[Record], test: Callable[[Record], bool]) -> dict:
    return wilson(sum(1 for r in records if test(r)), len(records))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- attacks
def _attack_rows(records: list[Record], arms: Arms) -> list[dict]:
    rows = []
    for key, group in _group(records).items():
        arm, budget = key[:3], group[0].budget
        delta_logodds = mean_ci(_values(group, "delta_logodds"))
        acc_drop = mean_ci([r.acc_control - r.acc_poisoned for r in group
                            if r.acc_control is not None and r.acc_poisoned is not None])
        norms = [r.norms or {} for r in group]
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(budget), "budget_key": key[3],
            "n": len(group), "delta_logodds": delta_logodds, "status": attack_status(delta_logodds),
            "delta_p": mean_ci(_values(group, "delta_p")),
            "success": _rate(group, lambda r: r.delta_logodds > 0),
            "success_p": _rate(group, lambda r: r.delta_p > 0),
            "flip": _rate(group, lambda r: bool(r.flip)),
            "top1": _rate(group, lambda r: bool(r.top1_poisoned)),
            "top1_control": _rate(group, lambda r: bool(r.top1_control)),
            "p_control": mean_ci(_values(group, "p_control")),
            "p_poisoned": mean_ci(_values(group, "p_poisoned")),
            "acc_drop": acc_drop,
            "linf": mean_ci([n["linf"] for n in norms if n.get("linf") is not None]),
            "l2": mean_ci([n["l2"] for n in norms if n.get("l2") is not None]),
            "values_changed": mean_ci([n["values_changed"] for n in norms if n.get("values_changed") is not None]),
            "off_grid": sum(int(n.get("off_grid") or 0) for n in norms),
            "out_of_range": sum(int(n.get("out_of_range") or 0) for n in norms),
            "records": group, "measure": "logodds",
        })
        if all(r.asr_poisoned is not None for r in group):
            rows[-1].update(_backdoor_figures(group))
        if all(_number(r.extra.get("target_count_control")) for r in group):
            rows[-1]["word_preference"] = _word_preference(group)
    return rows


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def _word_preference(group: list[Record]) -> dict:
    """A word-preference arm: Δf in the paper's normalisation (summed over each pair's probes, not averaged), the net
    share of probes whose prediction turned to B (greedy share poisoned minus control), and when it works: over the
    word pairs (repeats and seeds averaged), Spearman correlations of Δ log-odds per probe with the prior (the clean
    control's log-odds of B against A) and with log(count of B in the training corpus), bootstrap 95% CIs. The
    paper's claim, that Infusion best amplifies what the model already prefers, predicts a positive first one."""
    pairs: dict[str, list[Record]] = defaultdict(list)
    for r in group:
        pairs[f"{r.target.get('word_a')} → {r.target.get('word_b')}"].append(r)
    names = sorted(pairs)
    delta = np.array([np.mean([r.delta_logodds for r in pairs[n]]) for n in names])
    prior = np.array([np.mean([r.logodds_control for r in pairs[n]]) for n in names])
    count = np.array([pairs[n][0].extra["target_count_control"] for n in names], dtype=float)
    correlate = len(names) >= 4 and np.ptp(delta) > 0
    return {
        "delta_f": mean_ci([r.delta_logodds * r.extra["probes_control"] for r in group]),
        "flipped": mean_ci([r.extra["greedy_poisoned"] - r.extra["greedy_control"] for r in group]),
        "when_prior": bootstrap_ci(_spearman, prior, delta) if correlate and np.ptp(prior) > 0 else None,
        "when_count": bootstrap_ci(_spearman, np.log1p(count), delta) if correlate and np.ptp(count) > 0 else None,
        "points": [{"pair": n, "prior": float(p), "count": int(c), "delta": float(d)}
                   for n, p, c, d in zip(names, prior, count, delta)],
    }


def _backdoor_figures(group: list[Record]) -> dict:
    """A backdoor arm's figures: its ASR (mean over runs with a t-interval, and pooled over every triggered image
    with a Wilson interval), the same under the clean control, ΔASR (judged by the success rule) and the clean
    accuracy of the poisoned model and of the control."""
    def pooled(name: str) -> dict:
        return wilson(sum(int(round(getattr(r, name) * (r.triggered or 0))) for r in group),
                      sum(r.triggered or 0 for r in group))

    delta = mean_ci(_values(group, "delta_asr"))
    return {"measure": "asr", "status": attack_status(delta), "delta_asr": _within(delta, -1.0),
            "asr": _within(mean_ci(_values(group, "asr_poisoned"))),
            "asr_control": _within(mean_ci(_values(group, "asr_control"))),
            "asr_pooled": pooled("asr_poisoned"), "asr_control_pooled": pooled("asr_control"),
            "acc": _within(mean_ci(_values(group, "acc_poisoned"))),
            "acc_control": _within(mean_ci(_values(group, "acc_control")))}


def _within(summary: dict, lo: float = 0.0, hi: float = 1.0) -> dict:
    """A mean_ci of rates (or of their differences, lo = -1) with its interval cut to where the figure can lie."""
    if summary["lo"] is not None:
        summary.update(lo=max(lo, summary["lo"]), hi=min(hi, summary["hi"]))
    return summary


def _by_cell(records: list[Record]) -> dict[tuple, list[Record]]:
    """Records by (target, seed): the unit arms are paired on (an arm's repeats share one)."""
    out: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        out[(json.dumps(r.target, sort_keys=True), r.seed)].append(r)
    return out


def _paired(a: list[Record], b: list[Record], name: str) -> tuple[list[float], list[float]] | None:
    """Field `name` of two arms on the (target, seed) cells both ran, an arm's repeats on a cell by their mean;
    None with fewer than 2 shared cells."""
    cells_a, cells_b = _by_cell(a), _by_cell(b)
    shared = [c for c in cells_b if c in cells_a]
    if len(shared) < 2:
        return None
    mean = lambda group: float(np.mean([getattr(r, name) for r in group]))  # noqa: E731
    return [mean(cells_a[c]) for c in shared], [mean(cells_b[c]) for c in shared]


def _comparisons(attacks: list[dict]) -> list[dict]:
    """Each reference arm (an attack row) against every other arm of its dataset on the cells both ran; with
    several budgets, every budget of one against every budget of the other (each comparison names both)."""
    out = []
    for ref in attacks:
        if ref["arm"][1] not in REFERENCE_ATTACKS:
            continue
        for other in attacks:
            if other["arm"] == ref["arm"] or other["arm"][0] != ref["arm"][0]:
                continue
            measure = "delta_asr" if ref["measure"] == other["measure"] == "asr" else "delta_logodds"
            paired = _paired(ref["records"], other["records"], measure)
            if paired is None:
                continue
            entry = {"arm": ref["label"], "budget": ref["budget"], "versus": other["label"],
                     "versus_budget": other["budget"], "measure": measure, **paired_test(*paired)}
            if other["arm"][1:] == TOPLINE:
                entry["share_of_topline"] = {name: _share(*_paired(ref["records"], other["records"], name))
                                             for name in ("delta_p", "delta_logodds")}
            out.append(entry)
    return out


def _controls(attacks: list[dict]) -> None:
    """Mark each attack row with its own random-edit control: `is_control` (the row is one), and `control`, the
    attack's Δ log-odds against its control's (paired on the cells both ran: same dataset and budget, and the
    same documents where the control copied an arm's (`like`), else the same selection where both have one),
    or None where the run has no such control."""
    for row in attacks:
        row["is_control"], row["control"] = row["arm"][1] in RANDOM_CONTROLS, None
    for control in (r for r in attacks if r["is_control"]):
        params = control["records"][0].params or {}
        stands_for = params.get("like") or RANDOM_CONTROLS[control["arm"][1]]
        for row in attacks:
            own = row["records"][0].params or {}
            if params.get("like"):  # it copied one arm's documents: the arm of that name whose documents they are
                same_documents = _same_documents(row["records"], control["records"])
            else:
                same_documents = "selection" not in own or "selection" not in params or own["selection"] == params["selection"]
            if (row["is_control"] or row["control"] is not None or row["arm"][1] != stands_for
                    or row["arm"][0] != control["arm"][0] or row["budget_key"] != control["budget_key"]
                    or not same_documents):
                continue
            paired = _paired(row["records"], control["records"], "delta_logodds")
            if paired is not None:
                row["control"] = {"label": control["label"], "budget": control["budget"], **paired_test(*paired)}


def _same_documents(a: list[Record], b: list[Record]) -> bool:
    """Whether two arms edited the same documents on every (target, seed) cell both ran (at least one)."""
    cells_a, cells_b = _by_cell(a), _by_cell(b)
    shared = [c for c in cells_b if c in cells_a]
    return bool(shared) and all(r.poisoned_indices == cells_b[c][0].poisoned_indices
                                for c in shared for r in cells_a[c])


def _share(arm: list[float], topline: list[float]) -> float | None:
    """An arm's mean effect as a fraction of the topline's mean effect on the same cells."""
    top = float(np.mean(topline))
    return float(np.mean(arm)) / top if top else None


# --------------------------------------------------------------------------- detection and defence
def _metric_summary(group: list[Record], metric: str) -> dict:
    """Mean over cells with a t-interval; with one cell, that cell's own bootstrap CI over documents."""
    cells = [c for r in group if isinstance(c := getattr(r, metric), dict) and c.get("value") is not None]
    summary = mean_ci([c["value"] for c in cells])
    if len(cells) == 1:
        summary.update(lo=cells[0].get("lo"), hi=cells[0].get("hi"))
    if summary["lo"] is not None:  # every detection metric is a rate: its interval ends at 0 and 1
        summary.update(lo=max(0.0, summary["lo"]), hi=min(1.0, summary["hi"]))
    return summary


def _mean_roc(group: list[Record]) -> tuple[list[float], list[float]] | None:
    """Vertical average of the cells' ROC curves on a common FPR grid."""
    curves = [r.roc for r in group if isinstance(r.roc, dict) and len(r.roc.get("fpr") or []) >= 2]
    if not curves:
        return None
    tprs = [np.interp(ROC_GRID, np.asarray(c["fpr"], float), np.asarray(c["tpr"], float)) for c in curves]
    return ROC_GRID.tolist(), np.mean(tprs, axis=0).tolist()


def _detection_rows(records: list[Record], arms: Arms) -> list[dict]:
    rows = []
    for key, group in _group(records, extra="detector").items():
        arm = key[:3]
        metrics = {m: _metric_summary(group, m) for m, _ in DETECTION_METRICS}
        unedited = {m: _metric_summary(group, f"{m}_unedited") for m, _ in DETECTION_METRICS
                    if any(getattr(r, f"{m}_unedited") is not None for r in group)}
        named = [r for r in group if isinstance(r.details, dict) and "suspect_class" in r.details]
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(group[0].budget), "budget_key": key[3],
            "detector": key[4], "knowledge": "?" if group[0].knowledge is None else group[0].knowledge,
            "n": len(group), "metrics": metrics, "status": detection_status(metrics[PRIMARY_METRIC]),
            "unedited": unedited,
            # a detector that names a suspect class (Neural Cleanse): how often it is the target's, and judged so
            "names_target": _rate(named, _names_target) if named else None,
            "names_target_judged": _rate(named, lambda r: _names_target(r) and bool(r.details.get("backdoored")))
            if named else None,
            "flag_precision": mean_ci(_values(group, "flag_precision")),
            "flag_recall": mean_ci(_values(group, "flag_recall")),
            "flagged": mean_ci(_values(group, "flagged")),
            "seconds": positive_mean_ci(_values(group, "seconds")),
            "roc": _mean_roc(group),
        })
    return rows


def _names_target(r: Record) -> bool:
    return r.details.get("suspect_class") == (r.target or {}).get("class")


def defence_measure(records: list[Record]) -> str:
    """The attack field the defence figures compare: delta_logodds when every defence record carries
    delta_logodds_after, else delta_p (runs written before the bench recorded log-odds), never a mix."""
    if all(r.delta_logodds_after is not None for r in records):
        return "delta_logodds"
    log.warning("defence records without delta_logodds_after: the defence figures use Δp")
    return "delta_p"


def _defence_rows(records: list[Record], attacks: list[dict], arms: Arms, measure: str) -> list[dict]:
    """Residual effect after removing a detector's flags, on `measure` (see defence_measure), paired by cell."""
    delta_by_cell = {r.cell: getattr(r, measure) for a in attacks for r in a["records"] if r.cell is not None}
    after = f"{measure}_after"
    rows = []
    for key, group in _group(records, extra="detector").items():
        arm = key[:3]
        paired = [(delta_by_cell[r.cell], getattr(r, after)) for r in group if r.cell in delta_by_cell]
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(group[0].budget), "budget_key": key[3],
            "detector": key[4], "n": len(group),
            "before": mean_ci([b for b, _ in paired]),
            "after": mean_ci(_values(group, after)),
            "after_p": mean_ci(_values(group, "delta_p_after")),
            "residual_success": _rate(group, lambda r: getattr(r, after) > 0),
            "reduction": paired_test([b for b, _ in paired], [a for _, a in paired]) if paired else None,
            "cost": mean_ci([r.acc_control - r.acc_after for r in group]),
            # the removal's own price, the attack aside: the clean control with the same documents removed
            "cost_clean": mean_ci([r.acc_control - r.acc_control_removed for r in group
                                   if r.acc_control_removed is not None]),
            "removed": mean_ci(_values(group, "removed")),
            "removed_poisons": mean_ci(_values(group, "removed_poisons")),
        })
        if all(r.asr_after is not None for r in group):  # a backdoor: what removal leaves of its ASR
            pairs = [(r.delta_asr_before, r.delta_asr_after) for r in group if r.delta_asr_before is not None]
            rows[-1].update(asr_after=_within(mean_ci(_values(group, "asr_after"))),
                            delta_asr_after=_within(mean_ci(_values(group, "delta_asr_after")), -1.0),
                            delta_asr_before=_within(mean_ci([b for b, _ in pairs]), -1.0),
                            asr_reduction=paired_test([b for b, _ in pairs], [a for _, a in pairs]) if pairs else None)
    return rows


# --------------------------------------------------------------------------- mitigations
def _figure(records: list[Record], name: str) -> list[float]:
    """A mitigation figure's numeric values over records (a figure is optional, and a non-number is ignored)."""
    return [float(f[name]) for r in records if _number((f := r.figures or {}).get(name))]


def _per_control(records: list[Record], value: Callable[[Record], float | None]) -> dict:
    """mean_ci of value(record) over distinct clean controls (dataset, victim, seed, mitigation): runs that share
    a control share its accuracy, so they are one observation, not many."""
    by_control: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if (v := value(r)) is not None:
            by_control[tuple(str(getattr(r, k)) for k in ("dataset", "victim", "seed", "mitigation"))].append(v)
    return mean_ci([float(np.mean(v)) for v in by_control.values()])


def _accuracy_cost(r: Record) -> float | None:
    """The clean accuracy a mitigation costs: plain clean control minus the clean control trained under it."""
    if _number(r.acc_unmitigated) and _number(r.acc_control):
        return r.acc_unmitigated - r.acc_control
    return None


def _time_factors(records: list[Record]) -> list[float]:
    """Per run: the mitigated retrain's seconds over the plain retrain's of the same cell."""
    out = []
    for r in records:
        t = r.timings or {}
        if _number(t.get("retrain")) and _number(t.get("retrain_unmitigated")) and t["retrain_unmitigated"] > 0:
            out.append(t["retrain"] / t["retrain_unmitigated"])
    return out


def _certified(records: list[Record]) -> dict:
    """Share of runs whose poisoned-document count k is within the target's certified edit radius (Wilson)."""
    pairs = [(r.budget.get("k"), f["certified_radius_edit"]) for r in records
             if _number((f := r.figures or {}).get("certified_radius_edit")) and _number(r.budget.get("k"))]
    return wilson(sum(1 for k, radius in pairs if k <= radius), len(pairs))


def _mitigation_rows(records: list[Record], attacks: list[dict], arms: Arms) -> list[dict]:
    """Per mitigation and attack arm x budget: the effect under the mitigation (against a clean control trained
    under it), paired by cell and victim with the plain effect of the same runs (`attacks`: the attack rows),
    and what the mitigation costs in clean accuracy and training time, beside its own figures."""
    plain = {(r.cell, r.victim): r for a in attacks for r in a["records"] if r.cell is not None}
    rows = []
    for key, group in _group(records, extra="mitigation").items():
        arm = key[:3]
        paired = [(plain[c].delta_logodds, r.delta_logodds) for r in group if (c := (r.cell, r.victim)) in plain]
        unmitigated, mitigated = mean_ci([b for b, _ in paired]), mean_ci(_values(group, "delta_logodds"))
        backdoor = {}
        if all(r.delta_asr is not None for r in group):  # judged on ΔASR, against the plain ΔASR of the same runs
            pairs = [(plain[c].delta_asr, r.delta_asr) for r in group if (c := (r.cell, r.victim)) in plain]
            plain_asr, under = mean_ci([b for b, _ in pairs]), mean_ci(_values(group, "delta_asr"))
            backdoor = {"measure": "asr", "delta_asr": _within(under, -1.0), "unmitigated_asr": plain_asr,
                        "asr": _within(mean_ci(_values(group, "asr_poisoned"))),
                        "status": mitigation_status(plain_asr, under, NEUTRAL_ASR),
                        "asr_reduction": paired_test([b for b, _ in pairs], [a for _, a in pairs]) if pairs else None}
        rows.append({
            "arm": arm, "label": arms.label(arm), "budget": budget_label(group[0].budget), "budget_key": key[3],
            "mitigation": key[4], "n": len(group), "delta_logodds": mitigated, "unmitigated": unmitigated,
            "status": mitigation_status(unmitigated, mitigated), "measure": "logodds",
            "reduction": paired_test([b for b, _ in paired], [a for _, a in paired]) if paired else None,
            "flip": _rate(group, lambda r: bool(r.flip)),
            "acc_cost": _per_control(group, _accuracy_cost), "time_factor": mean_ci(_time_factors(group)),
            "epsilon": mean_ci(_figure(group, "epsilon")), "delta": sorted(set(_figure(group, "delta"))),
            "epsilon_covers": sorted({str(f["epsilon_covers"]) for r in group
                                      if (f := r.figures or {}).get("epsilon_covers") is not None}),
            "clipped_fraction": mean_ci(_figure(group, "clipped_fraction")),
            "parts": sorted({int(v) for v in _figure(group, "parts")}),
            "radius": mean_ci(_figure(group, "certified_radius_edit")), "certified": _certified(group),
            "records": group, **backdoor,
        })
    return sorted(rows, key=lambda r: (r["mitigation"], r["arm"], r["budget_key"]))


def _mitigation_costs(rows: list[dict]) -> dict[str, dict]:
    """Per mitigation, over all its runs: clean accuracy, time, certified runs, ε."""
    records: dict[str, list[Record]] = defaultdict(list)
    for m in rows:
        records[m["mitigation"]] += m["records"]
    return {name: {"acc_cost": _per_control(rs, _accuracy_cost), "time_factor": mean_ci(_time_factors(rs)),
                   "certified": _certified(rs), "epsilon": mean_ci(_figure(rs, "epsilon"))}
            for name, rs in records.items()}


# --------------------------------------------------------------------------- the run
def _not_run(records: list[Record]) -> list[dict]:
    """Each distinct reason a detector did not run (a 'skip' record per cell), with how many runs it held for."""
    counts: dict[tuple, int] = defaultdict(int)
    for r in records:
        counts[(str(r.detector), str(r.reason))] += 1
    return [{"detector": d, "reason": reason, "n": n} for (d, reason), n in sorted(counts.items())]


def _errors(records: dict[str, list[Record]], arms: Arms) -> list[dict]:
    """The errors that stand: the last of each (cell, stage, detector); an attack's is superseded once its cell has
    an attack record (a later run got through it)."""
    done = {r.cell for r in records["attack"]}
    latest = {(r.cell, r.stage, r.detector): r for r in records["error"] if not (r.stage == "attack" and r.cell in done)}
    return [{"label": arms.label(Arms.key(r)), "budget": budget_label(r.budget), "attack": r.attack, "cell": r.cell,
             "target": r.target, "seed": r.seed, "stage": r.stage, "detector": r.detector, "error": r.error,
             "message": r.message, "where": r.where} for r in latest.values()]


def _timings(records: dict[str, list[Record]]) -> list[dict]:
    """Wall time by stage, summed over the records that report it."""
    stages: dict[str, list[float]] = defaultdict(list)
    for r in records["attack"]:
        for stage, seconds in (r.timings or {}).items():
            if isinstance(seconds, (int, float)):
                stages[f"attack: {stage}"].append(float(seconds))
    for r in records["detection"]:
        if isinstance(r.seconds, (int, float)):
            stages[f"detector: {r.detector}"].append(float(r.seconds))
    for r in records["mitigation"]:
        for stage, seconds in (r.timings or {}).items():
            if _number(seconds):
                stages[f"mitigation {r.mitigation}: {stage}"].append(float(seconds))
    return [{"stage": s, "n": len(v), "total": sum(v), "mean": positive_mean_ci(v)} for s, v in sorted(stages.items())]


def summarise(records: dict[str, list[Record]]) -> dict:
    """Every summary of a run's records (by kind, as `load_records` or `by_kind` gives them):

    'attacks', 'detection', 'defence', 'mitigations': rows per arm x budget (and detector or mitigation), each
    attack row with its random-edit control (`is_control`, `control`: see _controls);
    'defence_measure': the effect the defence rows compare (see defence_measure); 'mitigation_costs': per
    mitigation over all its runs; 'comparisons': each reference arm against the others, with its share of the
    topline; 'not_run': why detectors did not run; 'errors': the plugins that raised (see _errors); 'timings':
    wall time by stage; 'counts' (records by kind), 'targets' (distinct dataset x target), 'cells' (distinct
    attack cells), 'domains' (of the attack records).
    """
    arms = Arms(records["attack"])
    attacks = _attack_rows(records["attack"], arms)
    _controls(attacks)
    measure = defence_measure(records["defence"])
    mitigations = _mitigation_rows(records["mitigation"], attacks, arms)
    return {
        "attacks": attacks, "detection": _detection_rows(records["detection"], arms),
        "defence": _defence_rows(records["defence"], attacks, arms, measure), "defence_measure": measure,
        "mitigations": mitigations, "mitigation_costs": _mitigation_costs(mitigations),
        "comparisons": _comparisons(attacks), "not_run": _not_run(records["skip"]),
        "errors": _errors(records, arms), "timings": _timings(records),
        "counts": {kind: len(rows) for kind, rows in records.items()},
        "targets": len({(r.dataset, json.dumps(r.target, sort_keys=True)) for r in records["attack"]}),
        "cells": len({r.cell for r in records["attack"]}),
        "domains": sorted({r.domain or "image" for r in records["attack"]}),
    }


# --------------------------------------------------------------------------- text
def ci_text(summary: dict | None, digits: int = 3, with_n: bool = True) -> str:
    """fmt_ci's 'value [lo, hi] (n=..)', without the n where a table has its own n column; in scientific
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


def number_text(value: float | None, digits: int = 3) -> str:
    """A figure with `digits` decimals, in scientific notation when nonzero but too small for them."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2e}" if value and abs(value) < 0.5 * 10 ** -digits else f"{value:.{digits}f}"


def in_points(summary: dict) -> dict:
    """An accuracy difference's summary (0..1) in percentage points."""
    return {k: (v * 100 if k in ("mean", "lo", "hi", "sd") and v is not None else v) for k, v in summary.items()}


def _rate_text(rate: dict) -> str:
    return "n/a" if rate["rate"] is None else f"{rate['rate']:.0%} ({rate['k']}/{rate['n']})"


def _columns(rows: list[tuple]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def corr_text(c: dict | None) -> str:
    """A correlation with its bootstrap CI ('+0.41 [+0.02, +0.70]'), or n/a."""
    if c is None:
        return "n/a"
    return f"{c['value']:+.2f}" + ("" if c["lo"] is None else f" [{c['lo']:+.2f}, {c['hi']:+.2f}]")


def word_preference_text(w: dict) -> str:
    """A word-preference arm's paper-normalised Δf, flipped share and when-it-works correlations, in one line."""
    return (f"Δf summed over the probes {ci_text(w['delta_f'], 2, False)}, net share of probes flipped to B "
            f"{ci_text(w['flipped'], 3, False)}; over {len(w['points'])} word pairs, Spearman of Δ log-odds with the "
            f"prior log-odds {corr_text(w['when_prior'])}, with log(count of B) {corr_text(w['when_count'])}")


def format_table(summary: dict) -> str:
    """The targeted attack rows as a text table (each arm x budget: n, mean Δ log-odds and Δp with 95% CIs, the
    outcome, both success rates, flips, clean accuracy lost), the backdoor rows as another (ASR and clean accuracy,
    each beside the clean control's, and ΔASR, with 95% CIs), then each comparison of a reference arm with the
    others."""
    header = ("attack", "budget", "n", "mean Δ log-odds [95% CI]", "mean Δp [95% CI]", "outcome",
              "Δ log-odds > 0", "Δp > 0", "flipped", "accuracy lost (points)")
    targeted = [a for a in summary["attacks"] if a["measure"] != "asr"]
    backdoors = [a for a in summary["attacks"] if a["measure"] == "asr"]
    lines = _columns([header] + [(a["label"], a["budget"], str(a["n"]), ci_text(a["delta_logodds"], 3, False),
                                  ci_text(a["delta_p"], 4, False), a["status"], _rate_text(a["success"]),
                                  _rate_text(a["success_p"]), _rate_text(a["flip"]),
                                  ci_text(in_points(a["acc_drop"]), 2, False)) for a in targeted]) if targeted else []
    if backdoors:
        lines += ([""] if lines else []) + _columns(
            [("backdoor", "budget", "n", "ASR [95% CI]", "ASR, clean control", "ΔASR [95% CI]", "outcome",
              "ASR pooled (triggered images)", "clean accuracy", "clean accuracy, control")]
            + [(a["label"], a["budget"], str(a["n"]), ci_text(a["asr"], 3, False), ci_text(a["asr_control"], 3, False),
                ci_text(a["delta_asr"], 3, False), a["status"], ci_text(a["asr_pooled"], 3),
                ci_text(a["acc"], 3, False), ci_text(a["acc_control"], 3, False)) for a in backdoors])
    for a in targeted:
        if "word_preference" in a:
            lines.append(f"{a['label']}, {a['budget']}: " + word_preference_text(a["word_preference"]))
    for c in summary["comparisons"]:
        name = "ΔASR" if c["measure"] == "delta_asr" else "Δ log-odds"
        line = f"{c['arm']}, {c['budget']} vs {c['versus']}, {c['versus_budget']}: "
        if c["p_wilcoxon"] is None:
            line += f"no difference in {name} over {c['n']} paired runs"
        else:
            line += (f"mean difference in {name} {ci_text(c['diff'], 3, False)} over {c['n']} paired runs, "
                     f"wins {c['wins']}/{c['n']}, Wilcoxon p={c['p_wilcoxon']:.2g}")
        share = c.get("share_of_topline")
        if share is not None:
            line += "; share of the topline: " + ", ".join(f"{share[m]:.3f} in {label}" for m, label in
                                                           (("delta_p", "Δp"), ("delta_logodds", "Δ log-odds"))
                                                           if share[m] is not None)
        lines.append(line)
    for e in summary["errors"]:
        lines.append(f"error: {e['label']}, {e['budget']}, target {json.dumps(e['target'], sort_keys=True)}, "
                     f"{e['detector'] or e['stage']}: {e['message']}")
    return "\n".join(lines)
