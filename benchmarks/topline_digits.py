"""Does the inverse-Hessian product limit Infusion's share of the topline on digits?

Runs the scenario and 30 targets of `infusion-audit attack digits` with two arms, quantized Infusion and
probe insertion x k (the topline: k copies of the target image labelled with the target class), under each
influence setting: EK-FAC at damping 1e-3 (the default), 1e-2 and 1e-1, and the exact IHVP (conjugate
gradient) at 1e-2 on the first `--exact-targets` targets (about 16 s a target). Prints, per setting,
Infusion's mean Δ log-odds and its share of the topline's (the same figure `attack` prints) and the time.
Resumable: each setting is its own run folder under OUT. Usage, from the repository root:

    python benchmarks/topline_digits.py --out runs/topline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from infusion_audit.config import load_config
from infusion_audit.evaluation import AttackEvaluation, AttackRunConfig, AttackSpec, summarize
from infusion_audit.io import write_json
from infusion_audit.runtime import configure


def run(out: Path, backend: str, damping: float, targets: int | None) -> dict:
    config = load_config(AttackRunConfig, "digits")
    config.attack.attacks = [AttackSpec("infusion"), AttackSpec("probe-insertion")]
    config.attack.influence.backend, config.attack.influence.damping = backend, damping
    if targets is not None:
        config.attack.targets.n = targets
    run_dir = out / f"{backend}-{damping:g}"
    started = time.perf_counter()
    records = AttackEvaluation(config, run_dir, progress=False).run(run_dir / "results.jsonl")
    summary = summarize(records)
    (topline,) = [c for c in summary["comparisons"] if c["arm"].startswith("infusion") and "share_of_topline" in c]
    (infusion,) = [row for name, row in summary["arms"].items() if name.startswith("infusion")]
    return {"backend": backend, "damping": damping, "targets": config.attack.targets.n,
            "infusion_logodds": infusion["delta_logodds"], "share_of_topline": topline["share_of_topline"],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--exact-targets", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure(args.threads)
    settings = [("ekfac", 1e-3, None), ("ekfac", 1e-2, None), ("ekfac", 1e-1, None),
                ("exact", 1e-2, args.exact_targets)]
    results = [run(args.out, *setting) for setting in settings]
    write_json(args.out / "summary.json", {"results": results})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
