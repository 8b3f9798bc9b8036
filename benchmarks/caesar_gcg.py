"""Do Infusion's token choices beat random edits of the same documents on Caesar? GCG against the relaxed optimiser.

For each optimiser, runs the built-in `bench-caesar` grid (12 targets) with only `infusion-text` (the paper's
document selection and objective: most-negative, raw influence; bench-caesar itself now uses most-improvable
documents and the cosine objective) and
`random-tokens` (random edits of the same documents and per-document token counts, `--random-seeds`
seeds per target), no detectors, into a folder of OUT named by the settings (resumable: the
bench skips finished cells), then prints, per optimiser, Infusion minus random (the per-target mean over seeds) in
Δ log-odds: mean with 95% CI, wins out of n, Wilcoxon p, and the wall time. Usage, from the repository root:

    python benchmarks/caesar_gcg.py --out /tmp/caesar-gcg                # gcg and relaxed, 3 random seeds
    python benchmarks/caesar_gcg.py --out DIR --optimizers gcg --candidates 256 --top-k 22 --targets 4
    python benchmarks/caesar_gcg.py --out DIR --optimizers gcg --selection most-improvable --objective influence \
        --top-k 32 --steps 10 --targets 4                                  # which part of bench-caesar's arm works
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from infusion_audit.bench import bench, load_bench_config
from infusion_audit.evaluation import AttackSpec, summarize
from infusion_audit.io import write_json
from infusion_audit.runtime import configure
from infusion_audit.stats import mean_ci


def run(out: Path, optimizer: str, random_seeds: int, targets: int | None, params: dict) -> dict:
    """`params`: infusion-text's candidates, top_k, steps, selection, objective and screen."""
    config = load_bench_config("bench-caesar")
    config.attack.attacks = [AttackSpec("infusion-text", {"optimizer": optimizer, **params}),
                             AttackSpec("random-tokens", repeats=random_seeds)]
    config.scan.attacks = ["none"]  # no detectors: only the effects are compared
    if targets is not None:  # the first n ordered pairs of shifts, in the bench's order
        data = config.scenario.dataset.params
        shifts = range(data["min_shift"], data["max_shift"] + 1)
        config.attack.targets.pairs = [[s, t] for s in shifts for t in shifts if s != t][:targets]
    tag = optimizer if optimizer == "relaxed" else f"gcg-c{params['candidates']}-k{params['top_k']}"
    if params["selection"] != "most-negative" or params["objective"] != "influence":
        tag += f"-{params['selection']}-{params['objective']}-s{params['screen']}"
    out = out / f"{tag}-steps{params['steps']}"
    started = time.perf_counter()
    records = bench(config, out, jobs=2, report=False).records["attack"]
    seconds = time.perf_counter() - started
    summary = summarize(records)
    by_attack = {name: [r for r in records if r["attack"] == name] for name in ("infusion-text", "random-tokens")}
    (paired,) = [c for c in summary["comparisons"] if c["versus"].startswith("random-tokens")]
    return {"optimizer": optimizer, **params, "random_seeds": random_seeds,
            "wall_seconds_this_invocation": round(seconds, 1),
            "craft_seconds": sum(r["timings"]["craft"] for r in by_attack["infusion-text"]),
            "paired_logodds": paired,
            "infusion_logodds": mean_ci([r["delta_logodds"] for r in by_attack["infusion-text"]]),
            "random_logodds": mean_ci([r["delta_logodds"] for r in by_attack["random-tokens"]]),
            "tokens_changed": mean_ci([r["norms"]["values_changed"] for r in by_attack["infusion-text"]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--optimizers", nargs="+", default=["gcg", "relaxed"], choices=["gcg", "relaxed"])
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--targets", type=int, default=None, help="only the first N targets (default: all 12)")
    parser.add_argument("--candidates", type=int, default=64, help="gcg: swaps per document scored exactly per step")
    parser.add_argument("--top-k", type=int, default=4, help="gcg: tokens per position to draw swaps from")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--selection", default="most-negative", choices=["most-negative", "most-improvable"])
    parser.add_argument("--objective", default="influence", choices=["influence", "cosine"])
    parser.add_argument("--screen", type=int, default=16, help="most-improvable: swaps per document screened")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure(args.threads)
    params = {"candidates": args.candidates, "top_k": args.top_k, "steps": args.steps, "selection": args.selection,
              "objective": args.objective, "screen": args.screen}
    results = [run(args.out, name, args.random_seeds, args.targets, params) for name in args.optimizers]
    write_json(args.out / "summary.json", {"results": results})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
