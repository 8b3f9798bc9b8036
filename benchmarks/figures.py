"""README's measured figures, from the runs README's own commands make: run them, render the tables, check them.

    python benchmarks/figures.py run [--only NAME ...] [--seeds 0 2 3]   every experiment, once per training seed
    python benchmarks/figures.py render                                 summaries -> benchmarks/results/figures.json
                                                                        and README's tables
    python benchmarks/figures.py check                                  README's tables == figures.json's (a test)
    python benchmarks/figures.py compare DIR                            another machine's runs against README's
                                                                        prediction intervals

A training run's numbers move with the order floats are summed in (torch's thread count, the CPU's vector
width: `ATEN_CPU_CAPABILITY=avx2` on an AVX-512 machine gives other last bits, which training amplifies).
So every experiment runs with training seeds 0, 2 and 3 (`--set pipeline.train.seed=S`; seed 0 is the
built-in config as it is; seed 1's digits model falls below the pipeline's quality floor and is refused), and README
gives each figure as the mean over seeds with the 95% prediction interval of one more run (another seed or another
machine) and the seeds' range, and each conclusion with the number of seeds it holds on. Every table between
``<!-- figures:EXPERIMENT:TABLE -->`` and ``<!-- /figures -->`` in README.md is written by `render`; none is typed
by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIGURES = ROOT / "benchmarks" / "results" / "figures.json"
SEEDS = (0, 2, 3)  # seed 1's digits model is refused by the quality floor (test accuracy 0.8993 < 0.9)

# name -> the README command that makes the run, less --out and the seed (both added here)
EXPERIMENTS = {
    "bench-digits": ["bench"],
    "attack-digits": ["attack", "digits"],
    "bench-digits-hardening": ["bench", "bench-digits-hardening"],
    "bench-caesar": ["bench", "bench-caesar"],
    "bench-wordpref": ["bench", "bench-wordpref"],
}
# <!-- figures:EXPERIMENT:TABLE[:ONLY] -->: ONLY, a regular expression, keeps the rows whose "attack (budget)" it
# matches (e.g. k=14)
MARKER = re.compile(r"(<!-- figures:(?P<experiment>[\w-]+):(?P<table>[\w-]+)(?::(?P<only>[^>]*?))? -->\n)"
                    r"(?P<body>.*?)(<!-- /figures -->)", re.S)


# --------------------------------------------------------------------------- run
def run(names: list[str], seeds: list[int], out: Path) -> None:
    """Each experiment's README command once per seed into out/NAME/seed-S (a finished run resumes in seconds)."""
    for name in names:
        for seed in seeds:
            run_dir = out / name / f"seed-{seed}"
            command = [sys.executable, "-m", "infusion_audit", "-q", *EXPERIMENTS[name], "--out", str(run_dir),
                       "--set", f"pipeline.train.seed={seed}"]
            print(" ".join(["infusion-audit", *command[3:]]), flush=True)
            t0 = time.perf_counter()
            subprocess.run(command, check=True, cwd=out)
            print(f"  {time.perf_counter() - t0:.0f} s", flush=True)


# --------------------------------------------------------------------------- summarise
def summarise_run(run_dir: Path) -> dict:
    """What README's tables need from one run directory, JSON-able."""
    from infusion_audit.results import load_records, summarise

    summary = summarise(load_records(run_dir))
    provenance = json.loads((run_dir / "provenance.json").read_text())

    def mean(ci: dict | None) -> float | None:
        return None if not ci else ci.get("mean", ci.get("value"))

    return {
        "attacks": [{"label": a["label"], "budget": a["budget"], "n": a["n"], "status": a["status"],
                     "delta_logodds": {k: a["delta_logodds"][k] for k in ("mean", "lo", "hi")},
                     "delta_p": mean(a["delta_p"]), "success": [a["success"]["k"], a["success"]["n"]],
                     "flip": [a["flip"]["k"], a["flip"]["n"]], "acc_drop": mean(a["acc_drop"])}
                    for a in summary["attacks"]],
        "comparisons": [{k: c[k] for k in ("arm", "budget", "versus", "versus_budget", "n", "wins", "p_wilcoxon")}
                        | {"diff": {k: c["diff"][k] for k in ("mean", "lo", "hi")},
                           "share_of_topline": c.get("share_of_topline")} for c in summary["comparisons"]],
        "detection": [{"label": d["label"], "budget": d["budget"], "detector": d["detector"],
                       "knowledge": d["knowledge"], "auroc": mean(d["metrics"]["auroc"]),
                       "tpr": mean(d["metrics"]["tpr_at_1fpr"]),
                       "auroc_unedited": mean(d["unedited"].get("auroc")),
                       "tpr_unedited": mean(d["unedited"].get("tpr_at_1fpr"))} for d in summary["detection"]],
        "mitigations": [{"label": m["label"], "budget": m["budget"], "mitigation": m["mitigation"],
                         "delta_logodds": {k: m["delta_logodds"][k] for k in ("mean", "lo", "hi")},
                         "status": m["status"], "acc_cost": mean(m["acc_cost"]),
                         "time_factor": mean(m["time_factor"])} for m in summary["mitigations"]],
        "seconds": provenance.get("seconds_this_invocation"),
        "compute": provenance.get("compute"),
    }


def collect(out: Path) -> dict:
    """Every experiment and seed run under `out` to its end (a run writes provenance.json last), summarised."""
    figures = {}
    for name in EXPERIMENTS:
        seeds = {int(p.name.split("-")[1]): summarise_run(p) for p in sorted((out / name).glob("seed-*"))
                 if (p / "provenance.json").exists()}
        if seeds:
            figures[name] = {"command": "infusion-audit " + " ".join(EXPERIMENTS[name]), "seeds": seeds}
    return figures


# --------------------------------------------------------------------------- tables
def prediction_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% prediction interval of one more run (another seed, or another machine) from these runs:
    mean ± t(0.975, n-1) · sd · sqrt(1 + 1/n); None with fewer than 2 runs."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean, sd = sum(values) / n, statistics.stdev(values)
    half = float(stats.t.ppf(0.975, n - 1)) * sd * math.sqrt(1 + 1 / n)
    return mean - half, mean + half


def spread(values: list[float], digits: int = 2) -> str:
    """Mean over seeds, the 95% prediction interval of another run, and the seeds' range."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    interval = prediction_interval(values)
    if interval is None:
        return f"{mean:.{digits}f}"
    return (f"{mean:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}] "
            f"(seeds {min(values):.{digits}f} to {max(values):.{digits}f})")


def _rows(seeds: dict, kind: str, key, only: str = "") -> list[tuple[tuple, list[dict]]]:
    """The rows of `kind` matched across seeds by `key`, in the first seed's order; with `only` (a regular
    expression), those whose "attack (budget)" it matches."""
    first = [r for r in next(iter(seeds.values()))[kind]
             if re.search(only, f"{r.get('label', r.get('arm'))} ({r['budget']})")]
    by_seed = [{key(r): r for r in s[kind]} for s in seeds.values()]
    return [(key(r), [b[key(r)] for b in by_seed if key(r) in b]) for r in first]


def _table(header: str, seeds: dict, kind: str, key, only: str, row) -> str:
    """A markdown table of `kind`'s rows matched across seeds by `key` (see _rows): `row(key, rows)` writes
    each line (None leaves the row out)."""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    lines += [line for k, rows in _rows(seeds, kind, key, only) if (line := row(k, rows)) is not None]
    return "\n".join(lines)


def attacks_table(seeds: dict, only: str = "") -> str:
    def row(key, rows):
        label, budget = key
        succeeds = sum(r["status"] == "succeeds" for r in rows)
        positive = [sum(r["success"][0] for r in rows), sum(r["success"][1] for r in rows)]
        flips = [sum(r["flip"][0] for r in rows), sum(r["flip"][1] for r in rows)]
        return (f"| {label} ({budget}) | {spread([r['delta_logodds']['mean'] for r in rows])} | "
                f"{succeeds}/{len(rows)} seeds | {positive[0]}/{positive[1]} | {flips[0]}/{flips[1]} | "
                f"{spread([None if r['acc_drop'] is None else 100 * r['acc_drop'] for r in rows])} |")

    return _table("| attack (budget) | mean Δ log-odds: mean over seeds [95% PI] (seeds) | its 95% CI above 0 | "
                  "Δ log-odds > 0 | top-1 flips | accuracy lost (points) |", seeds, "attacks",
                  lambda r: (r["label"], r["budget"]), only, row)


def comparisons_table(seeds: dict, only: str = "") -> str:
    """Each reference arm against the arms of its own k, and against one probe insertion (whose k is 1)."""
    def row(_, rows):
        r0 = rows[0]
        same_k = r0["versus_budget"].split(",")[0] == r0["budget"].split(",")[0]
        if not same_k and not r0["versus"].startswith("probe-insertion (x1)"):
            return None
        shares = [(r["share_of_topline"] or {}).get("delta_logodds") for r in rows]
        ps = [r["p_wilcoxon"] for r in rows if r["p_wilcoxon"] is not None]
        return (f"| {r0['arm']} ({r0['budget']}) vs {r0['versus']} ({r0['versus_budget']}) | "
                f"{spread([r['diff']['mean'] for r in rows])} | "
                f"{sum(r['diff']['lo'] is not None and r['diff']['lo'] > 0 for r in rows)}/{len(rows)} | "
                f"{sum(r['diff']['hi'] is not None and r['diff']['hi'] < 0 for r in rows)}/{len(rows)} | "
                f"{sum(r['wins'] for r in rows)}/{sum(r['n'] for r in rows)} | "
                f"{f'{max(ps):.2g}' if ps else 'n/a'} | "
                f"{spread(shares, 3) if any(s is not None for s in shares) else ''} |")

    return _table("| paired on the same targets | mean difference in Δ log-odds [95% PI] (seeds) | CI above 0 | "
                  "CI below 0 | wins | largest Wilcoxon p | share of the topline (Δ log-odds) |", seeds, "comparisons",
                  lambda r: (r["arm"], r["budget"], r["versus"], r["versus_budget"]), only, row)


def detection_table(seeds: dict, only: str = "") -> str:
    def row(key, rows):
        detector, label, budget = key
        null = (f"{spread([r['auroc_unedited'] for r in rows])}, {spread([r['tpr_unedited'] for r in rows])}"
                if rows[0]["auroc_unedited"] is not None else "")
        return (f"| {detector} ({rows[0]['knowledge']}) | {label} ({budget}) | "
                f"{spread([r['auroc'] for r in rows])} | {spread([r['tpr'] for r in rows])} | {null} |")

    return _table("| detector (what the defender needs) | attack (budget) | AUROC | TPR at 1% FPR | the same documents "
                  "unedited: AUROC, TPR |", seeds, "detection", lambda r: (r["detector"], r["label"], r["budget"]),
                  only, row)


def mitigations_table(seeds: dict, only: str = "") -> str:
    def row(key, rows):
        mitigation, label, budget = key
        return (f"| {mitigation} | {label} ({budget}) | {spread([r['delta_logodds']['mean'] for r in rows])} | "
                f"{sum(r['status'] == 'neutralised' for r in rows)}/{len(rows)} seeds | "
                f"{spread([None if r['acc_cost'] is None else 100 * r['acc_cost'] for r in rows])} | "
                f"{spread([r['time_factor'] for r in rows], 1)}x |")

    return _table("| mitigation | attack (budget) | Δ log-odds under it [95% PI] (seeds) | neutralised | "
                  "clean accuracy lost (points) | retrain time |", seeds, "mitigations",
                  lambda r: (r["mitigation"], r["label"], r["budget"]), only, row)


def time_table(seeds: dict, only: str = "") -> str:
    lines = ["| training seed | wall time | torch threads | CPU capability |", "|---|---|---|---|"]
    for seed, s in seeds.items():
        compute = s.get("compute") or {}
        seconds = s.get("seconds")
        wall = "n/a" if seconds is None else f"{int(seconds // 60)} min {int(seconds % 60)} s"
        lines.append(f"| {seed} | {wall} | {compute.get('torch_threads', 'n/a')} | "
                     f"{compute.get('cpu_capability', 'n/a')} |")
    return "\n".join(lines)


TABLES = {"attacks": attacks_table, "comparisons": comparisons_table, "detection": detection_table,
          "mitigations": mitigations_table, "time": time_table}


def render_readme(text: str, figures: dict) -> str:
    """README's text with every marked table rendered from `figures`."""
    def table(match: re.Match) -> str:
        experiment, kind = match.group("experiment"), match.group("table")
        if experiment not in figures:
            raise SystemExit(f"README names {experiment}:{kind}, but figures.json has no run of {experiment}")
        seeds = {int(k): v for k, v in figures[experiment]["seeds"].items()}
        return match.group(1) + TABLES[kind](seeds, match.group("only") or "") + "\n" + match.group(6)

    return MARKER.sub(table, text)


# --------------------------------------------------------------------------- compare
def compare(figures: dict, other: dict) -> list[str]:
    """Each attack's mean Δ log-odds of another machine's runs against README's 95% prediction interval."""
    out = []
    for name, experiment in other.items():
        if name not in figures:
            continue
        ours = [{(r["label"], r["budget"]): r["delta_logodds"]["mean"] for r in s["attacks"]}
                for s in figures[name]["seeds"].values()]
        for seed, s in experiment["seeds"].items():
            for r in s["attacks"]:
                key = (r["label"], r["budget"])
                interval = prediction_interval([o[key] for o in ours if key in o])
                if interval is None:
                    continue
                inside = interval[0] <= r["delta_logodds"]["mean"] <= interval[1]
                out.append(f"{name} seed {seed} {key[0]} ({key[1]}): {r['delta_logodds']['mean']:.2f} "
                           f"{'within' if inside else 'OUTSIDE'} README's [{interval[0]:.2f}, {interval[1]:.2f}]; "
                           f"{r['status']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["run", "render", "check", "compare"])
    p.add_argument("dir", nargs="?", type=Path, help="compare: the other machine's runs folder")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "figures", help="where the runs live")
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = p.parse_args(argv)
    if args.action == "run":
        args.runs.mkdir(parents=True, exist_ok=True)
        run(args.only, args.seeds, args.runs.resolve())
        return 0
    if args.action == "render":
        figures = collect(args.runs)
        FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
        README.write_text(render_readme(README.read_text(encoding="utf-8"), figures), encoding="utf-8")
        print(f"wrote {FIGURES} and README.md's tables ({', '.join(figures)})")
        return 0
    figures = json.loads(FIGURES.read_text())
    if args.action == "check":
        text = README.read_text(encoding="utf-8")
        if render_readme(text, figures) != text:
            print("README.md's tables differ from figures.json: run `python benchmarks/figures.py render`")
            return 1
        return 0
    for line in compare(figures, collect(args.dir)):
        print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
