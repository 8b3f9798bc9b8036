"""Detector-aware Infusion on digits: what an attacker who knows the detectors can still do.

For each arm (plain Infusion, then `infusion-evasive` at several evasion quantiles and stealth
weights λ) and each of 30 targets (k = 1%, L-inf 1/16, quantized): the attack's Δ log-odds against
the clean control, and the detectors run by `infusion_audit.scan` on the poisoned set with the model
retrained on it (as the bench's detect_and_defend does): TPR at 1% FPR and AUROC of loss-outlier,
knn-label, spectral-signature, activation-clustering and forensic influence-outlier. Beside each
figure, its null: the same detectors' scores on the same documents UNEDITED (the clean control's
model on the clean set), which says how much of a detection the selection alone explains.

Records are appended to --out as cells finish (a rerun resumes); the table is printed and written as
JSON beside them.

    python benchmarks/adaptive_digits.py --targets 30
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from infusion_audit.config import PluginSpec, load_config
from infusion_audit.behaviour import ClassBehaviour
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.evaluation import AttackEvaluation, AttackRunConfig, AttackSpec, TargetsConfig
from infusion_audit.io import append_jsonl, read_jsonl, write_json
from infusion_audit.metrics import auroc, tpr_at_fpr
from infusion_audit.runtime import configure
from infusion_audit.scan import detector_label, scan
from infusion_audit.stats import fmt_ci, mean_ci

DETECTORS = [PluginSpec("loss-outlier"), PluginSpec("knn-label"), PluginSpec("spectral-signature"),
             PluginSpec("activation-clustering"), PluginSpec("influence-outlier", {"mode": "forensic"})]
MODEL_ONLY = ["loss-outlier", "knn-label", "spectral-signature", "activation-clustering"]
LOSS, ALL = ["loss-outlier"], ["loss-outlier", "knn-label", "spectral-signature"]
ARMS = [AttackSpec("infusion")] + [
    AttackSpec("infusion-evasive", {"evade": evade, "evade_quantile": q, "stealth": lam})
    for evade, q, lam in [(LOSS, 0.9, 0.0), (LOSS, 0.75, 0.0), (LOSS, 0.5, 0.0), (LOSS, 0.9, 1.0), (LOSS, 0.9, 10.0),
                          (ALL, 0.9, 1.0)]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=30)
    p.add_argument("--arms", default=None, help="comma-separated indices into ARMS (default: all)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/adaptive_digits"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_digits.jsonl"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    configure(1)
    cfg = load_config(AttackRunConfig, "digits")  # k = 0.01, eps = 1/16, L-inf, quantized; continue 1 epoch
    cfg.attack.attacks = ARMS if args.arms is None else [ARMS[int(i)] for i in args.arms.split(",")]
    cfg.attack.targets = TargetsConfig(n=args.targets, seed=0)
    cfg.attack.write_artefacts = False
    evaluation = AttackEvaluation(cfg, args.run_dir, progress=False)
    done = {r["cell"] for r in read_jsonl(args.out)}
    cells = {evaluation.cell_id(spec, target, seed): (spec, target, seed)
             for spec, target, seed, _ in evaluation.cells()}
    null = Null(evaluation)
    t0 = time.perf_counter()
    for cell, (spec, target, seed) in tqdm(cells.items(), desc="cells"):
        if cell in done:
            continue
        crafted = evaluation.craft(spec, target, seed)
        record, model = evaluation.record(crafted)
        result = scan(crafted.poisoned_set, detectors=DETECTORS, model=model,
                      behaviour=ClassBehaviour.from_target(target, evaluation.scenario.data.test),
                      truth=crafted.poisoning.indices, expected_fraction=cfg.attack.budget.k,
                      influence={"backend": "ekfac", "damping": 1e-3}, bootstrap=0, progress=False)
        detection = {label: {m: result.detection[label][m]["value"] for m in ("auroc", "tpr_at_1fpr")}
                     for label, _ in result.completed}
        append_jsonl(args.out, {**{k: record[k] for k in ("cell", "attack", "variant", "target", "seed",
                                                          "delta_logodds", "delta_p", "norms", "poisoned_indices")},
                                "params": record["params"], "detection": detection,
                                "null": null.detection(target, crafted.poisoning.indices),
                                "skipped": result.skipped})
    print(f"cells done in {time.perf_counter() - t0:.0f}s")
    print(table([r for r in read_jsonl(args.out) if r["cell"] in cells], args.out.with_suffix(".summary.json")))


class Null:
    """The detectors on the clean set with the clean control's model: scored once (forensic influence once
    per target), then measured against each cell's selection, unedited."""

    def __init__(self, evaluation: AttackEvaluation):
        self.test = evaluation.scenario.data.test
        self.context = AuditContext(evaluation.scenario.data.train, model=evaluation.victim.control()["model"],
                                    expected_fraction=evaluation.config.attack.budget.k, progress=False)
        self.scores = {detector_label(s): self._score(s) for s in DETECTORS if "mode" not in s.params}

    def _score(self, spec: PluginSpec) -> np.ndarray:
        return run_detector(build_detector(spec.name, spec.params), self.context).scores

    def detection(self, target, indices: np.ndarray) -> dict:
        self.context.behaviour = ClassBehaviour.from_target(target, self.test)
        scores = {**self.scores, **{detector_label(s): self._score(s) for s in DETECTORS if "mode" in s.params}}
        truth = np.zeros(len(self.context), dtype=bool)
        truth[indices] = True
        return {label: {"auroc": auroc(truth, s), "tpr_at_1fpr": tpr_at_fpr(truth, s, 0.01)}
                for label, s in scores.items()}


def table(records: list[dict], path: Path) -> str:
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(f"{r['attack']}[{r['variant']}]", []).append(r)
    labels = [detector_label(s) for s in DETECTORS]
    rows, lines = [], []
    for arm, rs in arms.items():
        row = {"arm": arm, "n": len(rs), "delta_logodds": mean_ci([r["delta_logodds"] for r in rs]), "detectors": {}}
        for label in labels:
            row["detectors"][label] = {
                f"{kind}_{m}": mean_ci([r[kind][label][m] for r in rs if label in r[kind]])
                for kind in ("detection", "null") for m in ("auroc", "tpr_at_1fpr")}
        best = max(MODEL_ONLY, key=lambda d: row["detectors"][d]["detection_tpr_at_1fpr"]["mean"])
        row["best_model_only"] = {"detector": best, "tpr_at_1fpr": row["detectors"][best]["detection_tpr_at_1fpr"]}
        row["goal_met"] = bool(row["delta_logodds"]["lo"] > 0 and row["best_model_only"]["tpr_at_1fpr"]["mean"] <= 0.2)
        rows.append(row)
        lines.append(f"{arm}  Δ log-odds {fmt_ci(row['delta_logodds'])}; best model-only detector {best} "
                     f"TPR@1%FPR {row['best_model_only']['tpr_at_1fpr']['mean']:.3f}; goal met: {row['goal_met']}")
        for label in labels:
            d = row["detectors"][label]
            lines.append(f"    {label:<36} TPR@1%FPR {fmt_ci(d['detection_tpr_at_1fpr'])} (unedited "
                         f"{d['null_tpr_at_1fpr']['mean']:.3f})  AUROC {fmt_ci(d['detection_auroc'])} (unedited "
                         f"{d['null_auroc']['mean']:.3f})")
    write_json(path, rows)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
