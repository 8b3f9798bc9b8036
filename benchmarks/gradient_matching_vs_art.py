"""Our `gradient-matching` against ART's GradientMatchingAttack and against Infusion, on shared targets.

The digits pipeline, k = 1% of the training documents, L-inf 1/16, every poison on the storage grid;
each attack's effect is Δ log-odds of the target class against the clean control retrained from the
same checkpoint in the same order (the attack grid: `bench.audit` without detection). Ours and ART's
get the same optimisation budget (steps x restarts). The grid's records go to --run-dir/results.jsonl
as cells finish (a rerun resumes) and this invocation's attack records are copied to --out; the table
prints mean Δ log-odds [95% CI] (n) per attack and paired Wilcoxon tests of ours against ART and
against Infusion, and is written beside the records as JSON.

    python benchmarks/gradient_matching_vs_art.py --targets 12
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from infusion_audit.bench import audit, prepare
from infusion_audit.config import AttackSpec, TargetsConfig, load_config, with_defaults
from infusion_audit.grid import Grid
from infusion_audit.io import atomic_write_text, write_json
from infusion_audit.results import load_records
from infusion_audit.statistics import fmt_ci, mean_ci, paired_test

OURS, ART, INFUSION = "gradient-matching", "gradient-matching-art", "infusion"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=12, help="shared targets (>= 10 for the issue's comparison)")
    p.add_argument("--steps", type=int, default=120, help="signed-Adam steps per restart, ours and ART's")
    p.add_argument("--restarts", type=int, default=4, help="restarts, ours and ART's")
    p.add_argument("--run-dir", type=Path, default=Path("runs/gradient_matching_vs_art"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gradient_matching_vs_art.jsonl"),
                   help="this invocation's attack records (JSON lines); the summary goes beside them")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = with_defaults(load_config("digits"))  # k = 0.01, eps = 1/16, L-inf, quantized; continue 1 epoch
    budget = {"steps": args.steps, "restarts": args.restarts}
    cfg.attack.attacks = [AttackSpec(OURS, budget), AttackSpec(ART, budget), AttackSpec(INFUSION, {"preset": "influence"})]
    cfg.attack.targets = TargetsConfig(n=args.targets, seed=0)
    cfg.attack.write_artefacts = False
    cfg = prepare(cfg, threads=1)
    t0 = time.perf_counter()
    audit(cfg, args.run_dir, jobs=1, progress=True, detect=False)
    keys = {cell.key for unit in Grid(cfg, args.run_dir, progress=False, detect=False).units() for cell in unit}
    records = [r.to_dict() for r in load_records(args.run_dir)["attack"] if r.cell in keys]
    atomic_write_text(args.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    print(f"{len(records)} records in {time.perf_counter() - t0:.0f}s (resumed cells included)")
    print(table(records, args))


def table(records: list[dict], args: argparse.Namespace) -> str:
    by_attack = {name: {(r["target"]["index"], r["target"]["class"]): r for r in records if r["attack"] == name}
                 for name in (OURS, ART, INFUSION)}
    shared = sorted(set.intersection(*(set(rs) for rs in by_attack.values())))
    effect = {name: [rs[t]["delta_logodds"] for t in shared] for name, rs in by_attack.items()}
    seconds = {name: mean_ci([rs[t]["timings"]["craft"] for t in shared]) for name, rs in by_attack.items()}
    summary = {"targets": len(shared), "steps": args.steps, "restarts": args.restarts,
               "delta_logodds": {name: mean_ci(v) for name, v in effect.items()},
               "craft_seconds": seconds,
               "ours_vs_art": paired_test(effect[OURS], effect[ART]),
               "ours_vs_infusion": paired_test(effect[OURS], effect[INFUSION])}
    write_json(args.out.with_suffix(".summary.json"), summary)
    lines = [f"{len(shared)} shared targets; k = 1%, L-inf 1/16, quantized; {args.restarts} restarts x {args.steps} "
             "steps for both gradient-matching implementations"]
    for name in (OURS, ART, INFUSION):
        lines.append(f"{name:<24} Δ log-odds {fmt_ci(summary['delta_logodds'][name])}   craft "
                     f"{seconds[name]['mean']:.2f}s per target")
    for key, other in (("ours_vs_art", ART), ("ours_vs_infusion", INFUSION)):
        c = summary[key]
        p = "n/a" if c["p_wilcoxon"] is None else f"{c['p_wilcoxon']:.3g}"
        lines.append(f"{OURS} - {other}: {fmt_ci(c['diff'])}, wins {c['wins']}/{c['n']}, Wilcoxon p = {p}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
