"""Scan a CIFAR-10-sized generated dataset (50,000 x 3x32x32) with every data-only and model-based detector.

Reports documents per second per detector, the shared forward pass separately, the process's peak
memory after each stage, and ART's SpectralSignatureDefense / ActivationDefence on the same
features (run time and overlap of the flagged sets). The model is the paper's TinyResNet at its
seeded initialisation: run time and memory do not depend on the weights (detection quality is
measured on trained models elsewhere). influence-outlier needs a full per-example gradient per
document, which on a CPU is far slower than everything else: it runs on a seeded subset and its
documents per second are reported with the subset size.

    python benchmarks/scan_scaling.py --out benchmarks/results/scan_scaling.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from infusion_audit.data import GRID_8BIT, ImageDataset
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.io import write_json
from infusion_audit.runtime import set_threads
from infusion_audit.models import TinyResNet

DETECTORS = [("perturbation-norm", {}), ("spectral-signature", {}), ("spectral-signature", {"centre": False}),
             ("activation-clustering", {}), ("knn-label", {}), ("loss-outlier", {}),
             ("loss-outlier", {"signal": "head-grad-norm"})]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def generated_dataset(n: int, seed: int = 0) -> ImageDataset:
    """Ten classes, each a smooth random colour pattern plus per-image noise, stored on the 8-bit grid."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    coarse = rng.uniform(0, 1, size=(10, 3, 4, 4)).astype(np.float32)
    patterns = coarse.repeat(8, axis=2).repeat(8, axis=3)
    x = np.empty((n, 3, 32, 32), dtype=np.float32)
    for start in range(0, n, 5000):
        stop = min(n, start + 5000)
        noise = rng.normal(0, 0.15, size=(stop - start, 3, 32, 32)).astype(np.float32)
        x[start:stop] = np.clip(np.round((patterns[y[start:stop]] + noise) * 255) / 255, 0, 1)
    return ImageDataset(x, y, num_classes=10, grid=GRID_8BIT, name=f"generated-{n}")


def art_comparison(context: AuditContext, ours: dict) -> dict:
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    feats, y = context.features(), context.labels
    onehot = np.eye(context.num_classes)[y]
    clf = PyTorchClassifier(model=torch.nn.Sequential(torch.nn.Identity()), loss=torch.nn.CrossEntropyLoss(),
                            input_shape=(feats.shape[1],), nb_classes=context.num_classes)
    out = {}
    t0 = time.perf_counter()
    _, is_clean = SpectralSignatureDefense(clf, feats, onehot, expected_pp_poison=context.expected_fraction,
                                           eps_multiplier=1.5).detect_poison()
    seconds = time.perf_counter() - t0
    flagged = np.asarray(is_clean) == 0
    mine = ours["spectral-signature(centre=False)"]
    out["spectral-signature"] = {"art_seconds": seconds, "ours_seconds": mine["seconds"],
                                 "art_flagged": int(flagged.sum()), "ours_flagged": mine["flagged"],
                                 "jaccard": _jaccard(flagged, mine["mask"])}
    np.random.seed(0)
    t0 = time.perf_counter()
    _, is_clean = ActivationDefence(clf, feats, onehot).detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA",
                                                                      cluster_analysis="smaller")
    seconds = time.perf_counter() - t0
    flagged = np.asarray(is_clean) == 0
    like_art = run_detector(build_detector("activation-clustering", {"criterion": "smaller"}), context)
    out["activation-clustering"] = {"art_seconds": seconds, "ours_seconds": like_art.seconds,
                                    "art_flagged": int(flagged.sum()), "ours_flagged": int(like_art.flagged.sum()),
                                    "jaccard": _jaccard(flagged, like_art.flagged),
                                    "note": "ours configured like ART: criterion 'smaller', 10 KMeans inits"}
    return out


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--influence-n", type=int, default=256, help="documents influence-outlier scores (subset)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scan_scaling.json"))
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default: 2, the CI machine's cores)")
    args = p.parse_args()
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    result = {"n": args.n, "shape": [3, 32, 32], "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "model": "tiny-resnet (seeded init)",
              "stages": [], "detectors": {}}

    t0 = time.perf_counter()
    data = generated_dataset(args.n)
    result["stages"].append({"stage": "generate", "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()})
    model = TinyResNet().eval()
    context = AuditContext(data, model=model, batch_size=500, progress=False)
    t0 = time.perf_counter()
    context.features()
    forward = time.perf_counter() - t0
    result["stages"].append({"stage": "forward (features + logits, shared)", "seconds": forward,
                             "docs_per_s": args.n / forward, "peak_rss_gib": peak_rss_gib()})
    print(f"forward pass: {forward:.1f}s ({args.n / forward:.0f} docs/s), peak RSS {peak_rss_gib():.2f} GiB",
          flush=True)

    ours = {}
    for name, params in DETECTORS:
        label = name + ("(" + ";".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")
        run = run_detector(build_detector(name, params), context)
        ours[label] = {"seconds": run.seconds, "flagged": int(run.flagged.sum()), "mask": run.flagged}
        result["detectors"][label] = {"knowledge": run.knowledge, "seconds": run.seconds,
                                      "docs_per_s": args.n / max(run.seconds, 1e-9),
                                      "docs_per_s_with_forward": None if run.knowledge == "data"
                                      else args.n / (run.seconds + forward),
                                      "flagged": int(run.flagged.sum()), "peak_rss_gib": peak_rss_gib()}
        print(f"{label:<40} {run.seconds:8.2f}s  {args.n / max(run.seconds, 1e-9):12.0f} docs/s  "
              f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)

    result["art"] = art_comparison(context, ours)
    for name, row in result["art"].items():
        print(f"ART {name}: {row['art_seconds']:.2f}s vs ours {row['ours_seconds']:.2f}s, "
              f"flagged {row['art_flagged']} vs {row['ours_flagged']}, Jaccard {row['jaccard']:.3f}", flush=True)

    subset = np.sort(np.random.default_rng(0).choice(args.n, args.influence_n, replace=False))
    small = AuditContext(data.subset(subset), model=model, batch_size=64, progress=False,
                         influence={"backend": "ekfac", "damping": 1e-3})
    run = run_detector(build_detector("influence-outlier", {"mode": "self", "chunk_size": 64}), small)
    fit = small.timings.get("ihvp", 0.0)
    scoring = run.seconds - fit
    result["detectors"]["influence-outlier(mode=self)"] = {
        "knowledge": run.knowledge, "n_scored": args.influence_n, "seconds": run.seconds,
        "ekfac_fit_seconds": fit, "docs_per_s": args.influence_n / max(scoring, 1e-9),
        "extrapolated_seconds_for_n": args.n / max(args.influence_n / max(scoring, 1e-9), 1e-9),
        "peak_rss_gib": peak_rss_gib(),
        "note": "per-example gradients of 308,650 parameters; scored on a seeded subset, EK-FAC fitted on it"}
    print(f"influence-outlier(mode=self) on {args.influence_n}: {run.seconds:.1f}s (EK-FAC fit {fit:.1f}s), "
          f"{args.influence_n / max(scoring, 1e-9):.1f} docs/s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    result["peak_rss_gib"] = peak_rss_gib()
    write_json(args.out, result)
    print(f"peak RSS {result['peak_rss_gib']:.2f} GiB; wrote {args.out}")


if __name__ == "__main__":
    main()
