"""Detector-aware Infusion on digits: what an attacker who knows the detectors can still do.

For each arm (plain Infusion, then `infusion-evasive` at several evasion quantiles and stealth
weights λ) and each of 30 targets (k = 1%, L-inf 1/16, quantized): the attack's Δ log-odds against
the clean control, and the detectors run on the poisoned set with the model retrained on it (the
bench grid's detection, `detection.detect`): TPR at 1% FPR and AUROC of loss-outlier, knn-label,
spectral-signature, activation-clustering and forensic influence-outlier. Beside each figure, its
null: the same detectors' scores on the same documents UNEDITED (the clean control's model on the
clean set, `detection.UneditedNull`), which says how much of a detection the selection alone explains.

The cells run as the bench's grid with detection and without defence (`bench.audit`) into --run-dir
(records appended as cells finish; a rerun resumes); each cell's row goes to --out (JSON lines), and
the table is printed and written as JSON beside them.

    python benchmarks/adaptive_digits.py --targets 30
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

from infusion_audit.bench import audit, prepare
from infusion_audit.config import (AttackSpec, DefenceConfig, PluginSpec, ScanConfig, TargetsConfig, load_config,
                                   with_defaults)
from infusion_audit.detection import detector_label
from infusion_audit.grid import Grid
from infusion_audit.io import atomic_write_text, write_json
from infusion_audit.results import Record, by_kind, load_records
from infusion_audit.statistics import fmt_ci, mean_ci

DETECTORS = [PluginSpec("loss-outlier"), PluginSpec("knn-label"), PluginSpec("spectral-signature"),
             PluginSpec("activation-clustering"), PluginSpec("influence-outlier", {"mode": "forensic"})]
MODEL_ONLY = ["loss-outlier", "knn-label", "spectral-signature", "activation-clustering"]
METRICS = ("auroc", "tpr_at_1fpr")
LOSS, ALL = ["loss-outlier"], ["loss-outlier", "knn-label", "spectral-signature"]
ARMS = [AttackSpec("infusion", {"preset": "influence"})] + [  # the recipe its results were measured with
    AttackSpec("infusion-evasive", {"evade": evade, "evade_quantile": q, "stealth": lam})
    for evade, q, lam in [(LOSS, 0.9, 0.0), (LOSS, 0.75, 0.0), (LOSS, 0.5, 0.0), (LOSS, 0.9, 1.0), (LOSS, 0.9, 10.0),
                          (ALL, 0.9, 1.0)]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=30)
    p.add_argument("--arms", default=None, help="comma-separated indices into ARMS (default: all)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/adaptive_digits"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_digits.jsonl"),
                   help="one row per cell (JSON lines); the summary goes beside it")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = with_defaults(load_config("digits"))  # k = 0.01, eps = 1/16, L-inf, quantized; continue 1 epoch
    cfg.attack.attacks = ARMS if args.arms is None else [ARMS[int(i)] for i in args.arms.split(",")]
    cfg.attack.targets = TargetsConfig(n=args.targets, seed=0)
    cfg.attack.write_artefacts = False
    # every arm scanned with the retrained model, ε = the budget, no bootstrap; no defence retrains
    cfg.scan = ScanConfig(detectors=DETECTORS, expected_fraction=cfg.attack.budget.k, bootstrap=0)
    cfg.defence = DefenceConfig(enabled=False)
    cfg = prepare(cfg, threads=1)
    t0 = time.perf_counter()
    audit(cfg, args.run_dir, jobs=1, progress=True, detect=True)
    print(f"cells done in {time.perf_counter() - t0:.0f}s")
    keys = {cell.key for unit in Grid(cfg, args.run_dir, progress=False).units() for cell in unit}
    records = by_kind(r for rows in load_records(args.run_dir).values() for r in rows if r.cell in keys)
    rows = cell_rows(records)
    atomic_write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(table(rows, args.out.with_suffix(".summary.json")))


def cell_rows(records: dict[str, list[Record]]) -> list[dict]:
    """One row per cell: the attack's effect, each detector's AUROC and TPR at 1% FPR on the poisoned set
    (`detection`) and on the same documents unedited (`null`), and the detectors that did not run."""
    detections: dict[str, dict] = defaultdict(dict)
    skipped: dict[str, dict] = defaultdict(dict)
    for d in records["detection"]:
        detections[d.cell][d.detector] = d
    for s in records["skip"]:
        skipped[s.cell][s.detector] = s.reason
    rows = []
    for r in records["attack"]:
        found = detections[r.cell]
        rows.append({"cell": r.cell, "attack": r.attack, "variant": r.variant, "target": r.target, "seed": r.seed,
                     "delta_logodds": r.delta_logodds, "delta_p": r.delta_p, "norms": r.norms,
                     "poisoned_indices": r.poisoned_indices, "params": r.params,
                     "detection": {label: {m: getattr(d, m)["value"] for m in METRICS} for label, d in found.items()},
                     "null": {label: {m: getattr(d, f"{m}_unedited")["value"] for m in METRICS}
                              for label, d in found.items() if d.auroc_unedited is not None},
                     "skipped": skipped[r.cell]})
    return rows


def table(records: list[dict], path: Path) -> str:
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(f"{r['attack']} ({r['variant']})" if r["variant"] else r["attack"], []).append(r)
    labels = [detector_label(s) for s in DETECTORS]
    rows, lines = [], []
    for arm, rs in arms.items():
        row = {"arm": arm, "n": len(rs), "delta_logodds": mean_ci([r["delta_logodds"] for r in rs]), "detectors": {}}
        for label in labels:
            row["detectors"][label] = {
                f"{kind}_{m}": mean_ci([r[kind][label][m] for r in rs if label in r[kind]])
                for kind in ("detection", "null") for m in METRICS}
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
