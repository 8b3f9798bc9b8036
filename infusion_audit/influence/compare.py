"""How close EK-FAC's IHVP comes to the exact one: cosine of the vectors and agreement of the
influence-score rankings they induce, per target.

    python -m infusion_audit.influence.compare [CONFIG] [--targets N] [--damping D]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.stats import spearmanr

from ..behaviour import measurement_gradient
from .ihvp import IHVP
from .scores import influence_scores


def compare_ihvps(model, dataset, queries: list, exact: IHVP, ekfac: IHVP, top: int = 14) -> list[dict]:
    """Per query gradient: cosine(v_exact, v_ekfac), Spearman of all scores, and the overlap of the
    `top` most negative documents (the ones Infusion would edit)."""
    rows = []
    for g in queries:
        t0 = time.perf_counter()
        vx = exact.solve(g)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        ve = ekfac.solve(g)
        t_ekfac = time.perf_counter() - t0
        sx, se = influence_scores(model, dataset, vx), influence_scores(model, dataset, ve)
        rows.append({
            "cosine": float(vx.double() @ ve.double() / (vx.double().norm() * ve.double().norm())),
            "spearman": float(spearmanr(sx, se)[0]),
            "top_overlap": len(set(np.argsort(sx)[:top]) & set(np.argsort(se)[:top])) / top,
            "exact_iterations": exact.info["iterations"][-1], "exact_residual": exact.info["residual"][-1],
            "exact_seconds": t_exact, "ekfac_seconds": t_ekfac,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..behaviour import sample_targets
    from ..config import load_config
    from ..evaluation import AttackRunConfig
    from ..pipeline import Pipeline, train_pipeline
    from .ihvp import make_ihvp

    p = argparse.ArgumentParser(description="compare the ekfac and exact IHVP backends on a scenario's targets")
    p.add_argument("config", nargs="?", default="digits")
    p.add_argument("--targets", type=int, default=5)
    p.add_argument("--damping", type=float, default=None, help="default: the config's influence damping")
    p.add_argument("--cache", default=".infusion-cache")
    args = p.parse_args(argv)
    cfg = load_config(AttackRunConfig, args.config)
    damping = args.damping or cfg.attack.influence.damping
    scenario = Pipeline.from_config(cfg.scenario)
    trained = train_pipeline(scenario, args.cache, progress=False)
    model, train = trained.model(), scenario.data.train
    targets = sample_targets(scenario.data.test, args.targets, seed=cfg.attack.targets.seed)
    queries = [measurement_gradient(model, scenario.behaviour(t)) for t in targets]
    t0 = time.perf_counter()
    ekfac = make_ihvp("ekfac", model, train, damping)
    fit = time.perf_counter() - t0
    rows = compare_ihvps(model, train, queries, make_ihvp("exact", model, train, damping, tol=1e-4), ekfac,
                         top=max(1, int(round(0.01 * len(train)))))
    for t, r in zip(targets, rows):
        print(json.dumps({"target": t.as_dict(), **{k: round(v, 4) for k, v in r.items()}}))
    print(json.dumps({"damping": damping, "ekfac_fit_seconds": round(fit, 2),
                      **{f"mean_{k}": round(float(np.mean([r[k] for r in rows])), 4)
                         for k in ("cosine", "spearman", "top_overlap", "exact_seconds")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
