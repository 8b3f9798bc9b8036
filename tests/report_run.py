"""A small but real run directory for the report tests, written without the benchmark runner.

Real: the trained digits scenario, its clean test accuracy, each target's p(target) before the
attack, the poisoned-set artefacts (small random on-grid edits written with `write_poisoned`),
their norms, and the test accuracy after one epoch of retraining on each poisoned set.
SYNTHETIC (test fixture only, marked `"fixture"` in every record): the attack effects (delta-log-odds, and
the delta-p that follows from it),
the detector scores behind the detection records, and the defence outcomes; they are drawn from
a seeded RNG so that the report has a succeeding and a failing attack, a caught and a missed one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from infusion_audit.config import AuditConfig, PipelineConfig, dump_yaml, from_dict, load_yaml, resolve_config_path
from infusion_audit.data import write_poisoned
from infusion_audit.io import append_jsonl, atomic_write_text, stable_hash, write_json
from infusion_audit.results import AttackRecord, DefenceRecord, DetectionRecord
from infusion_audit.statistics import wilson
from infusion_audit.pipeline import Pipeline, train_pipeline
from infusion_audit.training import accuracy, predict_proba

FIXTURE = "synthetic numbers written by tests/report_run.py, not measured"
HOSTILE = "<script>alert(1)</script>"
# attack -> (variant, mean delta-log-odds per budget step, per-detector separation of poison scores)
ATTACKS = {
    "infusion": ("quantized", [1.0, 2.0], {"spectral": 0.5, "influence": 4.0}),
    "random-noise": ("", [0.0, 0.0], {"spectral": 0.3, "influence": 0.2}),
    "label-flip": ("", [0.1, 0.3], {"spectral": 3.5, "influence": 2.5}),
}
BUDGETS = [{"k": 7, "eps": 0.25, "norm": "linf", "quantize": True},
           {"k": 14, "eps": 0.25, "norm": "linf", "quantize": True}]
KNOWLEDGE = {"spectral": "model", "influence": "forensic"}


def digits_scenario_config() -> PipelineConfig:
    """The pipeline section of the built-in digits config (other sections belong to other commands)."""
    raw, source = load_yaml(resolve_config_path("digits"))
    return from_dict(PipelineConfig, raw["pipeline"], source, "pipeline")


def trained_digits(cache_dir: Path):
    scenario = Pipeline.from_config(digits_scenario_config())
    return scenario, train_pipeline(scenario, cache_dir, progress=False)


def _detection_metrics(scores: np.ndarray, is_poison: np.ndarray) -> dict:
    """Real detection figures computed from (synthetic) scores, as a detector plugin would report them."""
    n_poison = int(is_poison.sum())
    fpr, tpr, _ = roc_curve(is_poison, scores)
    threshold_1 = np.quantile(scores[~is_poison], 0.99)
    threshold_5 = np.quantile(scores[~is_poison], 0.95)
    top_k = np.argsort(-scores)[:n_poison]
    flagged = scores > threshold_5
    pick = np.unique(np.linspace(0, len(fpr) - 1, 50).astype(int))
    return {  # AUROC/AUPRC without their bootstrap CI: the report's CIs over cells come from mean_ci
        "n": len(scores), "n_poison": n_poison,
        "auroc": {"value": float(roc_auc_score(is_poison, scores)), "lo": None, "hi": None, "n": len(scores)},
        "auprc": {"value": float(average_precision_score(is_poison, scores)), "lo": None, "hi": None,
                  "n": len(scores)},
        "tpr_at_1fpr": _as_value(wilson(int((scores[is_poison] > threshold_1).sum()), n_poison)),
        "tpr_at_5fpr": _as_value(wilson(int((scores[is_poison] > threshold_5).sum()), n_poison)),
        "recall_at_k": _as_value(wilson(int(is_poison[top_k].sum()), n_poison)),
        "flagged": int(flagged.sum()), "flag_precision": float(is_poison[flagged].mean()) if flagged.any() else 0.0,
        "flag_recall": float(flagged[is_poison].mean()),
        "roc": {"fpr": fpr[pick].tolist(), "tpr": tpr[pick].tolist()},
    }


def logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def sigmoid(logodds: float) -> float:
    return float(1 / (1 + np.exp(-logodds)))


def _as_value(rate: dict) -> dict:
    return {"value": rate["rate"], "lo": rate["lo"], "hi": rate["hi"], "n": rate["n"]}


def make_run(run_dir: Path, cache_dir: Path, *, targets: int = 4, detection: bool = True, defence: bool = True,
             hostile: bool = False) -> Path:
    """Write config.yaml, provenance.json, results.jsonl and artefacts/ under run_dir; returns run_dir."""
    scenario, trained = trained_digits(cache_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clean, test = scenario.data.train, scenario.data.test
    model = trained.model()
    acc_control = accuracy(model, test)
    proba = predict_proba(model, torch.from_numpy(test.x[:targets]))
    start = trained.checkpoint(len(trained.checkpoints) - 2)
    class_names = [f"digit {c}" for c in range(10)]
    if hostile:
        class_names[3] = HOSTILE
    atomic_write_text(run_dir / "config.yaml", dump_yaml(AuditConfig(pipeline=scenario.config))
                      + f"# {HOSTILE if hostile else 'fixture'}\n")
    write_json(run_dir / "provenance.json", {
        "note": FIXTURE, "class_names": {"digits": class_names},
        "packages": {"torch": torch.__version__, "numpy": np.__version__},
        "data_hashes": {"digits-train": clean.content_hash(), "digits-test": test.content_hash()},
        "seeds": [0], "scenario_fingerprint": scenario.fingerprint(),
    })
    results = run_dir / "results.jsonl"
    for attack, (variant, effects, separation) in ATTACKS.items():
        for budget, effect in zip(BUDGETS, effects):
            k = budget["k"]
            if attack == "label-flip":  # edits labels only: no perturbation bound
                budget = dict(budget, eps=None, norm=None, quantize=False)
            index = np.sort(rng.choice(len(clean), size=k, replace=False))
            if attack == "label-flip":
                poisoned = clean.with_documents(index, clean.x[index], (clean.y[index] + 1) % 10)
            else:
                edit = rng.integers(-4, 5, size=clean.x[index].shape) / 16.0
                poisoned = clean.with_documents(index, clean.quantize(clean.x[index] + edit))
            artefact = f"artefacts/{attack}-k{k}"
            write_poisoned(run_dir / artefact, clean, poisoned, index, {"attack": attack, "budget": budget})
            acc_poisoned = accuracy(scenario.continue_training(start, poisoned), test)
            delta = (poisoned.x[index] - clean.x[index]).reshape(k, -1)
            for t in range(targets):
                true = int(test.y[t])
                target_class = int(torch.argsort(proba[t])[-2])  # the runner-up class: a plausible target
                p_before = p_control = float(proba[t, target_class])  # retrained on clean data: no change
                delta_logodds = float(rng.normal(effect, 0.3))
                p_poisoned = sigmoid(logit(p_control) + delta_logodds)
                delta_p = p_poisoned - p_control
                cell = stable_hash([attack, variant, budget, t, 0])
                where = {"cell": cell, "dataset": "digits", "attack": attack, "variant": variant, "budget": budget,
                         "target": {"index": t, "true": true, "class": target_class}, "seed": 0,
                         "extra": {"fixture": FIXTURE}}
                append_jsonl(results, AttackRecord(
                    **where, p_before=p_before, p_control=p_control, p_poisoned=p_poisoned, delta_p=delta_p,
                    logodds_control=logit(p_control), logodds_poisoned=logit(p_control) + delta_logodds,
                    delta_logodds=delta_logodds, top1_control=False, top1_poisoned=p_poisoned > 0.5,
                    flip=p_poisoned > 0.5, acc_control=acc_control, acc_poisoned=acc_poisoned,
                    norms={"linf": float(np.abs(delta).max(1).mean()),
                           "l2": float(np.linalg.norm(delta, axis=1).mean()),
                           "values_changed": float((np.abs(delta) > 1e-7).sum(1).mean()), "off_grid": 0,
                           "out_of_range": 0},
                    poisoned_indices=index.tolist(), artefact=artefact if t == 0 else None,
                    timings={"craft": 1.5 + rng.random(), "retrain": 0.2}).to_dict())
                is_poison = np.zeros(len(clean), dtype=bool)
                is_poison[index] = True
                for detector, sep in separation.items():
                    if detection:
                        scores = rng.normal(size=len(clean)) + sep * is_poison
                        append_jsonl(results, DetectionRecord(**where, detector=detector, knowledge=KNOWLEDGE[detector],
                                                              seconds=0.1 + rng.random(),
                                                              **_detection_metrics(scores, is_poison)).to_dict())
                    if defence:
                        caught = min(1.0, sep / 4)
                        delta_logodds_after = delta_logodds * (1 - caught) + float(rng.normal(0, 0.05))
                        p_after = sigmoid(logit(p_control) + delta_logodds_after)
                        append_jsonl(results, DefenceRecord(
                            **where, detector=detector, removed=int(0.05 * len(clean)),
                            removed_poisons=int(round(caught * k)), p_after=p_after,
                            delta_p_after=p_after - p_control, delta_p_before=delta_p,
                            delta_logodds_after=delta_logodds_after, delta_logodds_before=delta_logodds,
                            acc_after=acc_control - abs(rng.normal(0.004, 0.002)), acc_control=acc_control).to_dict())
    if hostile:
        text_dir = run_dir / "artefacts" / "text-probe"
        append_jsonl(text_dir / "documents.jsonl", {"index": 5, "original": "the cat sat on the mat",
                                                    "poisoned": f"the cat {HOSTILE} sat on the mat"})
        append_jsonl(results, AttackRecord(
            cell="text-cell", dataset="digits", attack="probe-insertion", variant=HOSTILE, domain="text",
            budget={"k": 1, "eps": None, "norm": None, "quantize": False}, target={"index": 3, "true": 3, "class": 3},
            seed=0, delta_p=0.01, delta_logodds=0.5, artefact="artefacts/text-probe",
            extra={"fixture": FIXTURE}).to_dict())
    return run_dir


_REMOTE_REFERENCE = re.compile(r"""(?:\bsrc|\bhref|\baction|\bposter|\bdata)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//"""
                               r"""|url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//|@import""", re.I)


def remote_references(html: str) -> list[str]:
    """Every attribute or CSS reference in `html` that points at a network location (scheme:// or //host)."""
    return [html[max(0, m.start() - 40):m.end() + 60] for m in _REMOTE_REFERENCE.finditer(html)]
