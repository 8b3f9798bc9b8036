"""Does the inverse-Hessian product limit Infusion's share of the topline on digits?

Runs the pipeline and 30 targets of `infusion-audit attack digits` with two arms, quantized Infusion and
probe insertion x k (the topline: k copies of the target image labelled with the target class), under each
influence setting: EK-FAC at damping 1e-3 (the default), 1e-2 and 1e-1, and the exact IHVP (conjugate
gradient) at 1e-2 on the first `--exact-targets` targets (about 16 s a target). Prints, per setting,
Infusion's mean Δ log-odds and its share of the topline's (the same figure `attack` prints) and the time.
Resumable: each setting is its own run folder under OUT (the attack grid, `bench.audit` without detection).
Usage, from the repository root:

    python benchmarks/topline_digits.py --out runs/topline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from infusion_audit.bench import audit, prepare
from infusion_audit.config import AttackSpec, load_config, with_defaults
from infusion_audit.grid import Grid
from infusion_audit.io import write_json
from infusion_audit.results import by_kind, load_records, summarise


def run(out: Path, backend: str, damping: float, targets: int | None, threads: int) -> dict:
    """One influence setting's grid (`targets`: how many of the config's targets; None: all 30)."""
    config = with_defaults(load_config("digits"))
    config.attack.attacks = [AttackSpec("infusion", {"preset": "influence"}), AttackSpec("probe-insertion")]
    config.influence = dataclasses.replace(config.influence, backend=backend, damping=damping)
    if targets is not None:
        config.attack.targets.n = targets
    config = prepare(config, threads=threads)
    run_dir = out / f"{backend}-{damping:g}"
    started = time.perf_counter()
    audit(config, run_dir, jobs=1, progress=False, detect=False)
    summary = summarise(by_kind(this_grid(config, run_dir)))
    (topline,) = [c for c in summary["comparisons"] if c["arm"].startswith("infusion") and "share_of_topline" in c]
    (infusion,) = [row for row in summary["attacks"] if row["arm"][1] == "infusion"]
    return {"backend": backend, "damping": damping, "targets": config.attack.targets.n,
            "infusion_logodds": infusion["delta_logodds"], "share_of_topline": topline["share_of_topline"],
            "seconds": round(time.perf_counter() - started, 1)}


def this_grid(config, run_dir: Path) -> list:
    """The attack records of this config's cells (a run folder may also hold cells of another target count)."""
    keys = {cell.key for unit in Grid(config, run_dir, progress=False, detect=False).units() for cell in unit}
    return [r for r in load_records(run_dir)["attack"] if r.cell in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", type=int, default=None, help="targets of the EK-FAC settings (default: 30)")
    parser.add_argument("--exact-targets", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    settings = [("ekfac", 1e-3, args.targets), ("ekfac", 1e-2, args.targets), ("ekfac", 1e-1, args.targets),
                ("exact", 1e-2, args.exact_targets)]
    results = [run(args.out, *setting, args.threads) for setting in settings]
    write_json(args.out / "summary.json", {"results": results})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
