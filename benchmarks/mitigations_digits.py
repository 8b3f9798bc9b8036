"""Mitigations on digits: how much of each attack per-example clipping, DP-SGD and partition
aggregation remove, and what they cost in clean accuracy and training time.

The default digits pipeline and protocol (continue from epoch 9 for one epoch), k = 1% of the training
documents, L-inf 1/16. Each attack (quantized Infusion, label flip, probe insertion x1) is crafted once
per target on the attacker's plainly trained model, then the victim is retrained on the poisoned set
under each mitigation ("none" is the plain retrain) and measured against a clean control retrained
under the SAME mitigation, so an effect is the poison's under that mitigation. Per (mitigation,
attack): mean Δp and Δ log-odds with 95% CIs, flip rate (Wilson), the control's clean accuracy and its
change from "none", and the retrain time; for partition, how many member votes for the target class
the poison moved, and the share of cells whose k poisons are within the target's certified edit radius
(where the vote provably cannot move). Partition's p is the ensemble's vote share for the class (see
VoteEnsemble), so its Δp and Δ log-odds measure votes, not one model's confidence. `--protocol scratch`
retrains from the initialisation instead (each shard's model sees only its shard: DPA proper).

Records are appended to --out as cells finish (a rerun resumes); the table is printed and written as
JSON beside them.

    python benchmarks/mitigations_digits.py --targets 10
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from infusion_audit.config import AttackSpec, TargetsConfig, load_config, with_defaults
from infusion_audit.io import append_jsonl, read_jsonl, stable_hash, write_json
from infusion_audit.mitigations import build_mitigation
from infusion_audit.protocol import Attacker, Victim
from infusion_audit.runtime import configure
from infusion_audit.statistics import fmt_ci, mean_ci, wilson

ARMS = [AttackSpec("infusion", {"preset": "influence"}), AttackSpec("label-flip"), AttackSpec("probe-insertion", {"copies": 1})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=10)
    p.add_argument("--mitigations", default="none,clip,dp-sgd,partition",
                   help="comma-separated; 'none' is the plain retrain")
    p.add_argument("--clip-norm", type=float, default=1.0, help="max_grad_norm of clip and dp-sgd")
    p.add_argument("--noise", type=float, default=1.0, help="noise_multiplier of dp-sgd")
    p.add_argument("--parts", type=int, default=10, help="parts of partition")
    p.add_argument("--partition-epochs", type=int, default=None,
                   help="epochs each partition member trains (default: the retrain's; from scratch a member needs "
                        "about `parts` times the recipe's epochs)")
    p.add_argument("--protocol", choices=["continue", "scratch"], default="continue",
                   help="retrain from epoch 9 for one epoch (the default protocol) or from scratch (true DPA shards)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/mitigations_digits"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mitigations_digits.jsonl"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    configure(1)
    params = {"none": None, "clip": {"max_grad_norm": args.clip_norm},
              "dp-sgd": {"noise_multiplier": args.noise, "max_grad_norm": args.clip_norm},
              "partition": {"parts": args.parts, **({"epochs": args.partition_epochs} if args.partition_epochs else {})}}
    names = args.mitigations.split(",")
    mitigations = {name: None if name == "none" else build_mitigation(name, params.get(name)) for name in names}
    cfg = with_defaults(load_config("digits"))  # k = 0.01, eps = 1/16, L-inf, quantized; continue 1 epoch
    cfg.attack.attacks = ARMS
    cfg.attack.targets = TargetsConfig(n=args.targets, seed=0)
    cfg.attack.protocol.kind = args.protocol
    cfg.attack.write_artefacts = False
    attacker = Attacker(cfg, args.run_dir, progress=False)
    retrain = Retrain(attacker, mitigations)
    done = {r["cell"] for r in read_jsonl(args.out)}
    keys = set()
    t0 = time.perf_counter()
    cells = [(target, spec) for target in attacker.targets() for spec in ARMS]
    for target, spec in tqdm(cells, desc="cells"):
        base = attacker.cell_key(spec, target, 0, cfg.attack.budget)  # the attack cell (pipeline, arm, target)
        cell_keys = {name: stable_hash({"cell": base, "mitigation": name, "params": params.get(name)})
                     for name in mitigations}
        keys.update(cell_keys.values())
        todo = [name for name in mitigations if cell_keys[name] not in done]
        if not todo:
            continue
        crafted = attacker.craft(spec, target, 0, cfg.attack.budget)
        behaviour = attacker.context.behaviour(target)
        x_star = attacker.pipeline.data.test.batch([target.index])[0][0]
        for name in todo:
            control = retrain.control(name)
            t1 = time.perf_counter()
            poisoned = retrain.victims[name].retrain(crafted.poisoned_set)
            seconds = time.perf_counter() - t1
            ctrl, after = behaviour.figures(control["retrained"].model), behaviour.figures(poisoned.model)
            k = len(crafted.poisoning.indices)
            record = {"cell": cell_keys[name], "attack_cell": base, "mitigation": name, "params": params.get(name),
                      "protocol": args.protocol, "attack": spec.name, "variant": crafted.variant, "k": k,
                      "target": target.as_dict(), "delta_p": after["p"] - ctrl["p"],
                      "delta_logodds": after["logodds"] - ctrl["logodds"],
                      "flip": bool(after["top1"] and not ctrl["top1"]),
                      "acc_control": control["accuracy"], "acc_poisoned": attacker.victim.quality(poisoned.model),
                      "retrain_seconds": seconds, "control_seconds": control["seconds"],
                      "figures": poisoned.figures, "control_figures": control["retrained"].figures}
            at = control["retrained"].figures_at(x_star)
            if at:
                record["control_at_target"] = at
                record["poisoned_at_target"] = poisoned.figures_at(x_star)
                record["within_radius"] = k <= at["certified_radius_edit"]
            append_jsonl(args.out, record)
    print(f"cells done in {time.perf_counter() - t0:.0f}s")
    records = [r for r in read_jsonl(args.out) if r["cell"] in keys]
    print(table(records, names, args.out.with_suffix(".summary.json")))


class Retrain:
    """One victim per mitigation: the attacker's pipeline retrained by the protocol (from the start checkpoint
    for the protocol's epochs, or from scratch) under that mitigation ("none": the plain retrain), and each
    mitigation's clean control, computed once and kept whole (its figures about the target input too)."""

    def __init__(self, attacker: Attacker, mitigations: dict):
        main = attacker.victim
        self.attacker = attacker
        self.victims = {name: main if mitigation is None else
                        Victim(main.pipeline, main.trained, main.protocol, mitigation)
                        for name, mitigation in mitigations.items()}
        self._controls: dict[str, dict] = {}

    def control(self, name: str) -> dict:
        if name not in self._controls:
            victim = self.victims[name]
            t0 = time.perf_counter()
            retrained = victim.retrain(self.attacker.pipeline.data.train)
            self._controls[name] = {"retrained": retrained, "seconds": time.perf_counter() - t0,
                                    "accuracy": victim.quality(retrained.model)}
        return self._controls[name]


def table(records: list[dict], names: list[str], path: Path) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["mitigation"], f"{r['attack']} ({r['variant']})" if r["variant"] else r["attack"]),
                          []).append(r)
    plain_acc = next((r["acc_control"] for r in records if r["mitigation"] == "none"), None)
    rows, lines = [], []
    for (name, arm), rs in sorted(groups.items(), key=lambda kv: (names.index(kv[0][0]), kv[0][1])):
        acc = rs[0]["acc_control"]
        row = {"mitigation": name, "arm": arm, "n": len(rs), "k": mean_ci([r["k"] for r in rs])["mean"],
               "delta_p": mean_ci([r["delta_p"] for r in rs]),
               "delta_logodds": mean_ci([r["delta_logodds"] for r in rs]),
               "flip": wilson(sum(r["flip"] for r in rs), len(rs)),
               "acc_control": acc, "acc_cost": None if plain_acc is None else plain_acc - acc,
               "acc_change_poisoned": mean_ci([r["acc_poisoned"] - r["acc_control"] for r in rs]),
               "retrain_seconds": mean_ci([r["retrain_seconds"] for r in rs]),
               "figures": {key: value for key, value in rs[0]["control_figures"].items() if isinstance(value, (int, float))}}
        if "within_radius" in rs[0]:
            row["within_radius"] = wilson(sum(r["within_radius"] for r in rs), len(rs))
            row["radius_edit"] = mean_ci([r["control_at_target"]["certified_radius_edit"] for r in rs])
            row["delta_votes"] = mean_ci([r["poisoned_at_target"]["votes"][r["target"]["class"]]
                                          - r["control_at_target"]["votes"][r["target"]["class"]] for r in rs])
        rows.append(row)
        extra = ", ".join(f"{key} {value:.4g}" for key, value in row["figures"].items()
                          if key in ("epsilon", "clipped_fraction", "parts"))
        if "within_radius" in row:
            extra += (f", votes for the target class moved {fmt_ci(row['delta_votes'], digits=2)}, certified edit "
                      f"radius {fmt_ci(row['radius_edit'], digits=2)}, k within it {row['within_radius']['k']}/{row['n']}")
        lines.append(f"{name:<10} {arm:<22} n={row['n']:<3} Δp {fmt_ci(row['delta_p'], digits=6)}  Δ log-odds "
                     f"{fmt_ci(row['delta_logodds'], digits=3)}  flips {row['flip']['k']}/{row['n']}  clean acc "
                     f"{acc:.4f}" + (f" (cost {row['acc_cost']:+.4f})" if row["acc_cost"] is not None else "")
                     + f"  retrain {row['retrain_seconds']['mean']:.2f}s" + (f"  [{extra}]" if extra else ""))
    write_json(path, rows)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
