"""Why EK-FAC and the exact IHVP disagree on the digits CNN, cause by cause, across damping values.

For N targets of a pipeline (default: digits) the exact IHVP (G + d I)^-1 g is solved directly
(`DenseGaussNewton`: the Gauss-Newton factor held in memory, machine precision at any damping, checked
against CG) and compared with:

- G's block diagonal solved exactly (what EK-FAC approximates: no cross-module curvature);
- EK-FAC as the project fits it (true Fisher, one sampled label per document), at two sampling seeds;
- EK-FAC fitted on the expected Fisher (every class weighted by its probability: no sampling noise);

at fixed dampings and at kronfluence's heuristic (0.1 x the mean corrected eigenvalue, pooled and per
module). Per damping: cosine of the IHVPs, Spearman of all influence scores, overlap of the top-1%
most negative documents, and per module the cosine of each EK-FAC against the exact block. Also: how
many parameters EK-FAC does not track (they get 0), G's spectrum against each damping, a CG cross-check
of the dense solve, and kronfluence's own pairwise scores against our application of its factors.

    python benchmarks/ekfac_fidelity.py [--targets 5] [--threads 1] [--out benchmarks/results/ekfac_fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE

from infusion_audit.behaviour import measurement_gradient, sample_targets
from infusion_audit.config import load_config, with_defaults
from infusion_audit.influence import influence_scores, loss_gradient, make_ihvp, per_example_gradients
from infusion_audit.influence.compare import (DenseGaussNewton, agreement, ekfac_solve, expected_fisher_ekfac,
                                              heuristic_damping, kronfluence_pairwise_scores, module_slices,
                                              tracked_mask)
from infusion_audit.io import write_json
from infusion_audit.pipeline import Pipeline, train_pipeline
from infusion_audit.runtime import configure

log = logging.getLogger("ekfac_fidelity")


def mean_rows(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


def block_cosines(A: torch.Tensor, B: torch.Tensor, slices: dict[str, list[slice]]) -> dict[str, float]:
    """Mean over rows of cosine(A_m, B_m) for each module m."""
    out = {}
    for name, ss in slices.items():
        a = torch.cat([A[:, s] for s in ss], 1).double()
        b = torch.cat([B[:, s] for s in ss], 1).double()
        out[name] = round(float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="digits")
    p.add_argument("--targets", type=int, default=5)
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="EK-FAC label-sampling seeds")
    p.add_argument("--cg-check", type=float, default=1e-2,
                   help="damping of the CG cross-check of the dense solve on the first target (0: skip)")
    p.add_argument("--tracked-only", action="store_true",
                   help="freeze the parameters EK-FAC does not track (BatchNorm...) for every solver and score")
    p.add_argument("--cache", default=".infusion-cache")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ekfac_fidelity.json"))
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # kronfluence's Analyzer lowers the root logger to WARNING
    configure(args.threads)
    t_start = time.perf_counter()

    cfg = with_defaults(load_config(args.config))
    pipeline = Pipeline.from_config(cfg.pipeline)
    model = train_pipeline(pipeline, args.cache, progress=False).model().eval()
    train = pipeline.data.train
    targets = sample_targets(pipeline.data.test, args.targets, seed=cfg.attack.targets.seed)
    untracked = int((~tracked_mask(model)).sum())
    if untracked and args.tracked_only:  # EK-FAC gives these 0: take both solvers and the scores without them
        tracked = {id(p) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                   for p in m.parameters(recurse=False)}
        for p in model.parameters():
            p.requires_grad_(id(p) in tracked)
    Q = torch.stack([measurement_gradient(model, pipeline.behaviour(t)) for t in targets]).double()
    top = max(1, int(round(0.01 * len(train))))
    slices = module_slices(model)
    mask = tracked_mask(model)
    results: dict = {"config": args.config, "n_train": len(train), "n_parameters": int(mask.numel()),
                     "targets": [t.as_dict() for t in targets], "top": top, "threads": torch.get_num_threads(),
                     "untracked_parameters": untracked, "tracked_only": bool(untracked and args.tracked_only),
                     "modules": {n: sum(s.stop - s.start for s in ss) for n, ss in slices.items()}}

    t0 = time.perf_counter()
    dense = DenseGaussNewton(model, train)
    results["dense_factor_seconds"] = round(time.perf_counter() - t0, 1)
    log.info("Gauss-Newton factor %s in %.0f s", tuple(dense.M.shape), time.perf_counter() - t0)

    workdir = tempfile.TemporaryDirectory(prefix="ekfac-fidelity-")
    default_damping = cfg.influence.damping
    ekfacs, fit_seconds = {}, {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        ekfacs[f"ekfac sampled (seed {seed})"] = make_ihvp("ekfac", model, train, default_damping, seed=seed,
                                                           cache_dir=workdir.name if seed == args.seeds[0] else None)
        fit_seconds[f"ekfac sampled (seed {seed})"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    ekfacs["ekfac expected Fisher"] = expected_fisher_ekfac(model, train, default_damping, train.num_classes)
    fit_seconds["ekfac expected Fisher"] = round(time.perf_counter() - t0, 2)
    results["ekfac_fit_seconds"] = fit_seconds
    reference = ekfacs[f"ekfac sampled (seed {args.seeds[0]})"]

    # kronfluence's own scores against our application of its factors (one training document as query)
    ours = influence_scores(model, train, reference.solve(loss_gradient(model, train.batch([0]))))
    theirs = kronfluence_pairwise_scores(reference, train, 0, default_damping, workdir.name)
    results["kronfluence_check"] = {
        "damping": default_damping, "query": "training document 0, its loss",
        "pearson": round(float(np.corrcoef(ours, theirs)[0, 1]), 8),
        "max_abs_diff_over_max_abs": float(np.abs(ours - theirs).max() / np.abs(theirs).max())}
    workdir.cleanup()
    log.info("kronfluence check %s", results["kronfluence_check"])

    # G's spectrum against the dampings and EK-FAC's mean eigenvalue (= trace / P)
    t0 = time.perf_counter()
    eig = dense.eigenvalues()
    eig = np.concatenate([eig, np.zeros(mask.numel() - len(eig))])  # all P of them: the rest are 0
    results["spectrum"] = {
        "seconds": round(time.perf_counter() - t0, 1), "max": float(eig[0]), "mean": float(eig.mean()),
        "nonzero_possible": len(dense.M), "quantiles": {q: float(np.quantile(eig, q)) for q in (0.5, 0.9, 0.99, 0.999)},
        "ekfac_mean_lambda": {k: heuristic_damping(e) / HEURISTIC_DAMPING_SCALE for k, e in ekfacs.items()}}
    log.info("spectrum %s", json.dumps(results["spectrum"]))

    per_example = per_example_gradients(model, train).double()
    scores = lambda X: (per_example @ X.T).T.numpy()  # noqa: E731  (one row of scores per target)

    dampings: list[tuple[str, float | dict]] = [(f"{d:g}", d) for d in args.dampings]
    dampings.append(("heuristic pooled", heuristic_damping(reference)))
    dampings.append(("heuristic per module", heuristic_damping(reference, per_module=True)))
    results["sweep"] = []
    kept: dict[str, dict[str, torch.Tensor]] = {}
    for label, d in dampings:
        t0 = time.perf_counter()
        X = dense.solve(Q, d)
        B = dense.solve(Q, d, block_diagonal=True)
        t_exact = time.perf_counter() - t0
        sx = scores(X)
        row = {"damping": label, "value": d, "exact_seconds": round(t_exact, 1),
               "exact_residual": float(dense.residual(Q, X, d).max()),
               "fraction_of_eigenvalues_below": float(np.mean(eig < d)) if not isinstance(d, dict) else None,
               "vs_exact": {}, "vs_block_diagonal": {}, "per_module_cosine_vs_exact_block": {}}
        solutions = {"exact block-diagonal": B, **{k: ekfac_solve(e, Q, d) for k, e in ekfacs.items()},
                     "gradient (no curvature)": Q}
        sb = scores(B)
        row["per_target_vs_exact"], solution_scores = {}, {}
        for k, V in solutions.items():
            sv = solution_scores[k] = scores(V)
            per_target = [agreement(X[i], V[i], sx[i], sv[i], top) for i in range(len(Q))]
            row["per_target_vs_exact"][k] = per_target
            row["vs_exact"][k] = mean_rows(per_target)
            if k != "exact block-diagonal":
                row["vs_block_diagonal"][k] = mean_rows([agreement(B[i], V[i], sb[i], sv[i], top)
                                                         for i in range(len(Q))])
            row["per_module_cosine_vs_exact_block"][k] = block_cosines(V, B, slices)
        seeds = [k for k in ekfacs if k.startswith("ekfac sampled")]
        if len(seeds) > 1:  # EK-FAC's own label-sampling noise
            a, b = seeds[:2]
            row["ekfac_seed_vs_seed"] = mean_rows([agreement(solutions[a][i], solutions[b][i], solution_scores[a][i],
                                                             solution_scores[b][i], top) for i in range(len(Q))])
        results["sweep"].append(row)
        kept[label] = {"exact": X, "ekfac": solutions[seeds[0]]}
        log.info("damping %s (%.0f s): %s", label, t_exact, json.dumps(row["vs_exact"]))

    # what each damping's solutions say about the exact IHVP at the project's damping
    default = f"{default_damping:g}"
    if default in kept:
        X0 = kept[default]["exact"]
        s0 = scores(X0)
        results["vs_exact_at_default_damping"] = {"default": default_damping}
        for label, sol in kept.items():
            results["vs_exact_at_default_damping"][label] = {}
            for k, V in sol.items():
                sV = scores(V)
                results["vs_exact_at_default_damping"][label][k] = mean_rows(
                    [agreement(X0[i], V[i], s0[i], sV[i], top) for i in range(len(Q))])

    if args.cg_check:
        cg = make_ihvp("exact", model, train, args.cg_check, tol=1e-6)
        v = cg.solve(Q[0].float())
        x = dense.solve(Q[:1], args.cg_check)[0]
        results["cg_check"] = {"damping": args.cg_check, "iterations": cg.info["iterations"][-1],
                               "cg_residual": cg.info["residual"][-1], "seconds": round(cg.info["seconds"][-1], 1),
                               "cosine_dense_vs_cg": float(x @ v.double() / (x.norm() * v.double().norm())),
                               "relative_difference": float((x - v.double()).norm() / x.norm())}
        log.info("CG check %s", results["cg_check"])

    results["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, results)
    print(json.dumps({r["damping"]: r["vs_exact"] for r in results["sweep"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
