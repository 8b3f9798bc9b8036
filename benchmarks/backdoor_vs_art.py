"""Our backdoor detectors beside ART's defences on the poisons of a backdoor bench (issue 25).

For every poisoned set a `bench-*-backdoor` run wrote (artefacts/poisoned/<cell>/), the victim is retrained
on it by the run's protocol (the model a defender would be handed) and ART's `ActivationDefence`,
`SpectralSignatureDefense` and `STRIP` judge it at their own operating points: each flags a set, whose share
of the poisons is ART's TPR and whose share of the clean documents its FPR. Ours is thresholded to flag no
larger share of the clean documents than ART did, and its TPR there is compared (wins, ties, losses over the
poisoned sets). Both sides are told the true share of poisons (ART's spectral signature flags a multiple of it).
ART has no PyTorch Neural Cleanse. ART's STRIP sets its threshold on clean held-out images: the pipeline's test
set, which the defender has.

    infusion-audit bench bench-digits-backdoor --out runs/backdoor
    python benchmarks/backdoor_vs_art.py runs/backdoor --out benchmarks/results/backdoor_vs_art.digits.json
    python benchmarks/backdoor_vs_art.py runs/backdoor --out benchmarks/results/backdoor_vs_art.digits.json --summarise
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from infusion_audit.config import load_config, with_defaults
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.io import write_json
from infusion_audit.metrics import tpr_at_fpr
from infusion_audit.protocol import Attacker
from infusion_audit.results import load_records
from infusion_audit.statistics import paired_test, wilson

DETECTORS = ("activation-clustering", "spectral-signature", "strip")


def art_flags(model: nn.Module, data, held_out: np.ndarray, features: np.ndarray, expected_fraction: float,
              strip_samples: int = 8) -> dict[str, np.ndarray]:
    """Which documents each of ART's defences flags (True: suspected poison), run as ART's documentation runs
    them: clustering and spectral signatures on the model's penultimate features per class, STRIP on the model's
    probabilities with its threshold set on `held_out` clean images at a 1% false-acceptance rate."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.defences.transformer.poisoning import STRIP
    from art.estimators.classification import PyTorchClassifier

    onehot = np.eye(data.num_classes)[data.y]
    identity = PyTorchClassifier(model=nn.Sequential(nn.Identity()), loss=nn.CrossEntropyLoss(),
                                 input_shape=(features.shape[1],), nb_classes=data.num_classes)
    np.random.seed(0)  # ART's k-means and STRIP draw from numpy's global state
    clean = {
        "activation-clustering": ActivationDefence(identity, features, onehot).detect_poison(
            nb_clusters=2, nb_dims=10, reduce="PCA", cluster_analysis="smaller")[1],
        "spectral-signature": SpectralSignatureDefense(identity, features, onehot, expected_pp_poison=expected_fraction,
                                                       eps_multiplier=1.5).detect_poison()[1],
    }
    lo, hi = data.value_range
    classifier = PyTorchClassifier(model=nn.Sequential(model, nn.Softmax(dim=1)), loss=nn.CrossEntropyLoss(),
                                   input_shape=data.input_shape, nb_classes=data.num_classes, clip_values=(lo, hi))
    strip = STRIP(classifier)(num_samples=strip_samples, false_acceptance_rate=0.01)
    strip.mitigate(held_out)
    clean["strip"] = [0 if row.sum() == 0 else 1 for row in strip.predict(data.x)]  # it abstains with zero rows
    return {name: np.asarray(flags) == 0 for name, flags in clean.items()}


def compare(model: nn.Module, data, truth: np.ndarray, held_out: np.ndarray, params: dict[str, dict],
            progress: bool = False) -> dict[str, dict]:
    """Per detector: ART's TPR and FPR at its operating point, and ours at ART's FPR on the same documents."""
    context = AuditContext(data, model=model, expected_fraction=float(truth.mean()), progress=progress)
    flags = art_flags(model, data, held_out, context.features(), float(truth.mean()))
    rows = {}
    for name in DETECTORS:
        art_tpr, art_fpr = float(flags[name][truth].mean()), float(flags[name][~truth].mean())
        ours = tpr_at_fpr(truth, run_detector(build_detector(name, params.get(name, {})), context).scores, art_fpr)
        rows[name] = {"art_tpr": art_tpr, "art_fpr": art_fpr, "ours_tpr": ours,
                      "poisons": int(truth.sum()), "clean": int((~truth).sum())}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="JSON: per poisoned set and per arm x detector")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blend", "clean-label-backdoor", "sleeper-agent"])
    p.add_argument("--held-out", type=int, default=300, help="clean test images ART's STRIP sets its threshold on")
    p.add_argument("--summarise", action="store_true", help="only reprint the table of an --out file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.summarise:
        summarise(json.loads(args.out.read_text())["sets"])
        return
    config = with_defaults(load_config(args.run_dir / "config.yaml"))
    attacker = Attacker(config, args.run_dir, progress=False)
    clean, test = attacker.pipeline.data.train, attacker.pipeline.data.test
    params = {spec.name: spec.params for spec in config.scan.detectors}
    records = list({r.cell: r for r in load_records(args.run_dir)["attack"]  # one per poisoned set (a transfer
                    if r.attack in args.attacks and r.artefact}.values())  # victim's record shares its cell)
    sets = []
    for rec in tqdm(records, desc="poisoned sets"):
        with np.load(args.run_dir / rec.artefact / "poisoned.npz", allow_pickle=False) as saved:
            labels = saved["y"]
        with np.load(args.run_dir / rec.artefact / "documents.npz", allow_pickle=False) as docs:
            index, x = docs["index"], docs["poisoned"]
        poisoned = clean.with_documents(index, x, labels[index])
        truth = np.zeros(len(poisoned), bool)
        truth[index] = True
        model = attacker.victim.retrain(poisoned).model.eval()
        rows = compare(model, poisoned, truth, test.x[:args.held_out], params)
        sets.append({"cell": rec.cell, "attack": rec.attack, "target": rec.target["class"], "detectors": rows})
    write_json(args.out, {"run": str(args.run_dir), "sets": sets, "table": summarise(sets)})


def summarise(sets: list[dict]) -> list[dict]:
    """Per arm x detector over the poisoned sets: ART's TPR and FPR and ours at ART's FPR, pooled over documents
    (Wilson intervals), and ours against ART's paired on the same sets (mean difference, wins, Wilcoxon)."""
    by_arm: dict[tuple, list] = defaultdict(list)
    for s in sets:
        for name, row in s["detectors"].items():
            by_arm[(s["attack"], name)].append(row)
    table = []
    print(f"{'arm':<21} {'detector':<22} {'n':>3}  {'ART TPR':<20} {'at ART FPR':<20} {'ours at that FPR':<20} "
          "ours - ART [95% CI], ahead / level / behind, Wilcoxon p")
    for (attack, name), rows in sorted(by_arm.items()):
        poisons, clean = sum(r["poisons"] for r in rows), sum(r["clean"] for r in rows)
        pooled = {key: wilson(round(sum(r[key] * r[of] for r in rows)), sum(r[of] for r in rows))
                  for key, of in (("art_tpr", "poisons"), ("art_fpr", "clean"), ("ours_tpr", "poisons"))}
        test = paired_test([r["ours_tpr"] for r in rows], [r["art_tpr"] for r in rows])
        diff = np.array([r["ours_tpr"] - r["art_tpr"] for r in rows])
        row = {"attack": attack, "detector": name, "sets": len(rows), "poisons": poisons, "clean": clean, **pooled,
               "ours_minus_art": test["diff"], "p_wilcoxon": test["p_wilcoxon"],
               "ahead": int((diff > 1e-9).sum()), "level": int((np.abs(diff) <= 1e-9).sum()),
               "behind": int((diff < -1e-9).sum())}
        table.append(row)
        p = "n/a" if row["p_wilcoxon"] is None else f"{row['p_wilcoxon']:.3g}"
        print(f"{attack:<21} {name:<22} {len(rows):>3}  "
              + " ".join(f"{_interval(pooled[key]):<20}" for key in ("art_tpr", "art_fpr", "ours_tpr"))
              + f" {_interval(test['diff'])}, {row['ahead']} / {row['level']} / {row['behind']}, p = {p}")
    return table


def _interval(summary: dict) -> str:
    """'0.123 [0.100, 0.146]' for a proportion (Wilson) or a mean (t-interval)."""
    value = summary.get("rate", summary.get("mean"))
    return f"{value:.3f}" + ("" if summary["lo"] is None else f" [{summary['lo']:.3f}, {summary['hi']:.3f}]")


if __name__ == "__main__":
    main()
