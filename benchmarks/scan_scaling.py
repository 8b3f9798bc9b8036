"""Scan a CIFAR-10-sized generated dataset (50,000 x 3x32x32) with every data-only and model-based detector.

Reports documents per second per detector, the shared forward pass separately, the process's peak
memory after each stage, and ART's SpectralSignatureDefense / ActivationDefence on the same
features (run time and overlap of the flagged sets). The model is the paper's TinyResNet trained
for two epochs on a seeded 5,000-document sample (the data is easy; run time does not depend on
the weights, agreement does).

influence-outlier runs over all 50,000 documents in its three modes the way a large scan should:
self-influence and probes with `backend: projected` (LoGra projections of every layer's gradient,
the Fisher in the projected space), forensic attribution with EK-FAC fitted on a 5,000-document
sample and applied layer by layer (exact, no per-document gradient). On a seeded 1,000-document
subset the scale path's scores are compared with the full-gradient way (per-example gradients of
every parameter, preconditioned by the same EK-FAC factors): Spearman and the overlap of the top 1%.

    python benchmarks/scan_scaling.py --out benchmarks/results/scan_scaling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from scipy.stats import spearmanr

from infusion_audit.behaviour import ClassBehaviour, measurement_gradient
from infusion_audit.config import TrainConfig
from infusion_audit.data import GRID_8BIT, ImageDataset
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.detectors.influence import most_helped
from infusion_audit.influence import per_example_gradients
from infusion_audit.io import write_json
from infusion_audit.runtime import configure
from infusion_audit.models import TinyResNet
from infusion_audit.training import train

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
    p.add_argument("--agreement-n", type=int, default=1000,
                   help="documents on which the scale path is compared with full-gradient scores")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scan_scaling.json"))
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default: 2, the CI machine's cores)")
    args = p.parse_args()
    configure(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    result = {"n": args.n, "shape": [3, 32, 32], "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "model": "tiny-resnet (2 epochs on 5,000)",
              "stages": [], "detectors": {}}

    t0 = time.perf_counter()
    data = generated_dataset(args.n)
    result["stages"].append({"stage": "generate", "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()})
    t0 = time.perf_counter()
    model = trained_tiny_resnet(data)
    result["stages"].append({"stage": "train TinyResNet (2 epochs, 5,000 documents)",
                             "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()})
    held_out = generated_dataset(1, seed=1)
    behaviour = ClassBehaviour(held_out.x[0], (int(held_out.y[0]) + 1) % 10, "a held-out document, another class")
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

    del context
    result["influence"] = influence_at_scale(data, model, behaviour, args.agreement_n)
    result["peak_rss_gib"] = peak_rss_gib()
    write_json(args.out, result)
    print(f"peak RSS {result['peak_rss_gib']:.2f} GiB; wrote {args.out}")


# The scale path (what the benchmark times over every document).
PROJECTED = {"backend": "projected", "rank": 16}
SCALE = {"self": PROJECTED, "probe": PROJECTED, "forensic": {"backend": "ekfac", "damping": 1e-3, "fit_size": 5000}}


def influence_at_scale(data: ImageDataset, model: torch.nn.Module, behaviour: ClassBehaviour, agreement_n: int) -> dict:
    """influence-outlier's three modes over every document (modes with the same backend share one context,
    as in a scan), then their agreement with full-gradient scores on a seeded subset."""
    probe = generated_dataset(100, seed=2)
    out = {"modes": {}}
    contexts, scores = {}, {}
    for mode, influence in SCALE.items():
        key = repr(influence)
        if key not in contexts:
            contexts[key] = AuditContext(data, model=model, behaviour=behaviour, probe=probe, batch_size=256,
                                         progress=False, influence=dict(influence))
        run = checked(run_detector(build_detector("influence-outlier", {"mode": mode}), contexts[key]))
        scores[mode] = run.scores
        out["modes"][mode] = {"influence": influence, "seconds": run.seconds, "docs_per_s": len(data) / run.seconds,
                              "peak_rss_gib": peak_rss_gib()}
        print(f"influence-outlier(mode={mode}) over {len(data)}: {run.seconds:.1f}s "
              f"({len(data) / run.seconds:.0f} docs/s) with {influence}, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    out["total_seconds"] = sum(m["seconds"] for m in out["modes"].values())
    out["peak_rss_gib"] = peak_rss_gib()  # the scan's; the comparison below holds full gradients
    print(f"influence-outlier, all three modes: {out['total_seconds'] / 60:.1f} min", flush=True)
    out["agreement"] = agreement(contexts[repr(PROJECTED)], contexts[repr(SCALE["forensic"])], scores, probe,
                                 agreement_n)
    return out


def agreement(projected: AuditContext, forensic: AuditContext, scores: dict, probe: ImageDataset, n: int,
              probes: int = 20) -> dict:
    """On n seeded documents, the scale path's scores against the full-gradient way: per-example gradients of
    every parameter, preconditioned by the same EK-FAC factors the forensic path fitted (on its sample).
    Probes: `probes` held-out inputs x 10 classes, each document's largest robust z of help, over the n."""
    data, model = forensic.data, forensic.model
    idx = np.sort(np.random.default_rng(0).choice(len(data), n, replace=False))
    ekfac, compact = forensic.ihvp(), projected.ihvp()
    grads = per_example_gradients(model, data, idx, batch_size=64)
    reference = {"self": np.concatenate([(g.double() * ekfac.solve_many(g).double()).sum(1).numpy()
                                         for g in grads.split(100)]),
                 "forensic": -(grads.double() @ ekfac.solve(measurement_gradient(model, forensic.behaviour))
                               .double()).numpy()}
    fast = {"self": scores["self"][idx], "forensic": scores["forensic"][idx]}
    inputs = probe.subset(np.arange(probes))
    queries = torch.cat([-per_example_gradients(model, dataclasses.replace(inputs, y=np.full(probes, c)))
                         for c in range(probe.num_classes)])
    reference["probe"] = most_helped((grads.double() @ ekfac.solve_many(queries).double().T).numpy())
    fast["probe"] = most_helped((projected.influence_rows(grads).double()
                                 @ compact.solve_many(projected.influence_rows(queries)).double().T).numpy())
    top, out = max(1, n // 100), {}
    for mode in SCALE:
        a, b = reference[mode], fast[mode]
        overlap = len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top
        out[mode] = {"n": n, "spearman": float(spearmanr(a, b)[0]), "top_1pct_overlap": overlap}
        print(f"agreement with full-gradient scores (EK-FAC), mode={mode}, {n} documents: Spearman "
              f"{out[mode]['spearman']:.3f}, top-1% overlap {overlap:.2f}", flush=True)
    return out


def checked(run):
    if run.skipped:
        raise SystemExit(f"{run.name} did not run: {run.skipped}")
    return run


def trained_tiny_resnet(data: ImageDataset, n: int = 5000) -> torch.nn.Module:
    """TinyResNet trained two epochs on a seeded sample (influence agreement means little on random weights)."""
    sample = data.subset(np.sort(np.random.default_rng(1).choice(len(data), min(n, len(data)), replace=False)))
    model = TinyResNet()
    train(model, sample, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=64, epochs=2), progress=False)
    return model.eval()


if __name__ == "__main__":
    main()
