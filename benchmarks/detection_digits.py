"""Detection figures against the poisons of an `infusion-audit attack` run (the issue's done-when).

For every poisoned set the attack run wrote (artefacts/poisoned/<cell>/), the defender's model is
the one the attack protocol trains on it (the model whose behaviour changed), the probe set is the
pipeline's held-out test set, and ε is the true poison fraction. Every detector configuration
below is run and scored against the manifest's ground truth; one detection record per (cell,
detector) goes to --out (JSON lines, the shared schema: `results.DetectionRecord`), and a table of
means with 95% CIs over cells is printed and written beside it.

    infusion-audit attack benchmarks/detection_digits.yaml --out runs/detection
    python benchmarks/detection_digits.py runs/detection --out benchmarks/results/detection_digits.jsonl
    python benchmarks/detection_digits.py runs/detection --selection-only \
        --out benchmarks/results/detection_digits.jsonl
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from infusion_audit.behaviour import ClassBehaviour, Target
from infusion_audit.config import PluginSpec, load_config, with_defaults
from infusion_audit.data import load_npz, read_manifest
from infusion_audit.detection import detector_label, evaluate_run
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.io import append_jsonl, read_jsonl, write_json
from infusion_audit.protocol import Attacker
from infusion_audit.results import AttackRecord, DetectionRecord, load_records
from infusion_audit.statistics import fmt_ci, mean_ci

SPECS = [
    PluginSpec("perturbation-norm", {"use_reference": False}),
    PluginSpec("perturbation-norm"),  # uses the clean reference copy the context holds
    PluginSpec("spectral-signature"),
    PluginSpec("spectral-signature", {"centre": False}),
    PluginSpec("activation-clustering"),
    PluginSpec("activation-clustering", {"criterion": "smaller"}),
    PluginSpec("knn-label"),
    PluginSpec("loss-outlier"),
    PluginSpec("loss-outlier", {"signal": "grad-norm"}),
    PluginSpec("influence-outlier", {"mode": "self"}),
    PluginSpec("influence-outlier", {"mode": "probe"}),
    PluginSpec("influence-outlier", {"mode": "forensic"}),
]
CONFIGS = {detector_label(s): s for s in SPECS}
METRICS = ("auroc", "tpr_at_1fpr", "recall_at_k")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/detection_digits.jsonl"))
    p.add_argument("--attacks", default="infusion,probe-insertion,label-flip")
    p.add_argument("--max-targets", type=int, default=10)
    p.add_argument("--bootstrap", type=int, default=300)
    p.add_argument("--selection-only", action="store_true",
                   help="instead: score the unedited documents each Infusion cell chose, with the clean model")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = with_defaults(load_config(args.run_dir / "config.yaml"))
    attacker = Attacker(cfg, args.run_dir, progress=False)
    clean, test = attacker.pipeline.data.train, attacker.pipeline.data.test
    wanted = set(args.attacks.split(","))
    records = [r for r in load_records(args.run_dir)["attack"]
               if r.attack in wanted and r.artefact and not (r.attack == "probe-insertion" and r.budget["k"] == 1)]
    targets = sorted({r.target["index"] for r in records})[:args.max_targets]
    records = [r for r in records if r.target["index"] in targets]
    if args.selection_only:
        selection_only(attacker, records, args.out.with_suffix(".unedited.jsonl"), args.bootstrap)
        summarise(args.out.with_suffix(".unedited.jsonl"))
        return
    done = {(r["cell"], r["detector"]) for r in read_jsonl(args.out) if r.get("kind") == "detection"}
    print(f"{len(records)} poisoned sets ({len(targets)} targets) x {len(CONFIGS)} detector configurations")
    for n, rec in enumerate(records):
        if all((rec.cell, label) in done for label in CONFIGS):
            continue
        t0 = time.perf_counter()
        artefact = args.run_dir / rec.artefact
        manifest = read_manifest(artefact)
        poisoned = load_npz(artefact / manifest["data"], num_classes=clean.num_classes)
        model = attacker.victim.retrain(poisoned).model
        t = rec.target
        behaviour = ClassBehaviour.from_target(Target(t["index"], t["class"], t["true"]), test)
        context = AuditContext(poisoned, model=model, reference=clean, behaviour=behaviour, probe=test,
                               expected_fraction=len(manifest["poisoned_indices"]) / len(poisoned), progress=False,
                               influence=cfg.influence)
        truth = np.zeros(len(poisoned), dtype=bool)
        truth[manifest["poisoned_indices"]] = True
        for label, spec in CONFIGS.items():
            if (rec.cell, label) in done:
                continue
            detector = build_detector(spec.name, spec.params)
            run = run_detector(detector, context)
            if run.skipped:
                continue
            record = DetectionRecord(**rec.shared_fields(), **{**evaluate_run(run, truth, bootstrap=args.bootstrap),
                                                               "detector": label}, extra={"delta_p": rec.delta_p})
            append_jsonl(args.out, record.to_dict())
        print(f"[{n + 1}/{len(records)}] {arm_label(rec.attack, rec.variant)} target {t['index']}->{t['class']}: "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    summarise(args.out)


def selection_only(attacker: Attacker, records: list[AttackRecord], out: Path, bootstrap: int) -> None:
    """Score the UNEDITED documents the attack chose, with the clean model: what a detector sees of the
    selection alone (arm '<attack> (<variant>/unedited)'). One context serves every cell."""
    clean = attacker.pipeline.data.train
    context = AuditContext(clean, model=attacker.victim.before, progress=False, influence=attacker.config.influence)
    runs = {label: run_detector(build_detector(CONFIGS[label].name, CONFIGS[label].params), context)
            for label in ("loss-outlier", "influence-outlier(mode=self)", "knn-label", "spectral-signature")}
    for rec in records:
        if rec.attack != "infusion":
            continue
        truth = np.zeros(len(clean), dtype=bool)
        truth[rec.poisoned_indices] = True
        for label, run in runs.items():
            fields = {**rec.shared_fields(), "variant": f"{rec.variant}/unedited"}
            record = DetectionRecord(**fields, **{**evaluate_run(run, truth, bootstrap=bootstrap), "detector": label})
            append_jsonl(out, record.to_dict())


def summarise(path: Path) -> None:
    rows = [DetectionRecord.from_dict(r, str(path)) for r in read_jsonl(path) if r.get("kind") == "detection"]
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(arm_label(r.attack, r.variant), r.knowledge, r.detector)].append(r)
    table = []
    for (arm, knowledge, detector), rs in sorted(groups.items()):
        row = {"arm": arm, "knowledge": knowledge, "detector": detector, "n_cells": len(rs)}
        for m in METRICS:
            row[m] = mean_ci([getattr(r, m)["value"] for r in rs])
        row["flag_precision"] = mean_ci([r.flag_precision for r in rs if r.flag_precision is not None])
        row["flag_recall"] = mean_ci([r.flag_recall for r in rs if r.flag_recall is not None])
        row["flagged"] = float(np.mean([r.flagged for r in rs]))
        table.append(row)
        print(f"{arm:<28} {knowledge:<9} {detector:<42} AUROC {fmt_ci(row['auroc'])}  TPR@1%FPR "
              f"{fmt_ci(row['tpr_at_1fpr'])}  recall@k {fmt_ci(row['recall_at_k'])}")
    write_json(path.with_suffix(".summary.json"), table)


def arm_label(attack: str, variant: str | None) -> str:
    """How the tables name an arm: 'attack (variant)'."""
    return f"{attack} ({variant})" if variant else attack


if __name__ == "__main__":
    main()
