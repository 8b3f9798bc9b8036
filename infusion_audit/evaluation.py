"""Honest attack evaluation: craft each (attack, target, seed) cell, retrain per the protocol, and
measure the behaviour against a clean control retrained from the same checkpoint in the same data
order (training is deterministic, so control and poisoned runs differ only by the poison).

`AttackEvaluation.run_cell` is the unit (one record); `run` loops it, appending to results.jsonl and
skipping cells already there; `summarize` gives means with 95% CIs and paired tests between attacks.

Record timings: `factors_shared` is paid once per scenario and `control_shared` once per protocol;
`ihvp` and `scores` once per target (arms on the same target reuse them); `select`, `pgd`, `craft`
(all of the attack's own work) and `retrain` are this cell's.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from .attacks.base import Attack, AttackContext, Poisoning, accepted_params
from .behaviour import Target, measure, sample_targets
from .config import ScenarioConfig, bounded, to_dict
from .data import write_poisoned
from .errors import ConfigError
from .io import append_jsonl, read_jsonl, stable_hash
from .registry import ATTACKS
from .stats import fmt_ci, mean_ci, paired_test, wilson
from .training import Scenario, TrainedScenario, accuracy, continue_training, retrain_from_scratch, train_scenario

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config
@dataclass
class AttackSpec:
    """One attack arm: a registered attack, its own params (over the shared budget), a table label."""

    name: str
    params: dict = field(default_factory=dict)
    variant: str | None = None


@dataclass
class TargetsConfig:
    """`n` seeded test images; `rule` random-other (one class != label each) or all-classes."""

    n: int = bounded(30, min=1)
    rule: Literal["random-other", "all-classes"] = "random-other"
    seed: int = 0


@dataclass
class BudgetConfig:
    """Shared by every attack that takes the key: k documents (count, or fraction of the train set)."""

    k: int | float = 0.01
    eps: float = bounded(1 / 16, gt=0)
    norm: Literal["linf", "l2"] = "linf"
    quantize: bool = True

    def validate(self, source: str, prefix: str) -> None:
        if isinstance(self.k, int) and self.k < 1 or isinstance(self.k, float) and not 0 < self.k <= 1:
            raise ConfigError(source, f"{prefix}.k", "a count >= 1 or a fraction in (0, 1]", self.k)


@dataclass
class InfluenceConfig:
    backend: Literal["exact", "ekfac"] = "ekfac"
    damping: float = bounded(1e-3, gt=0)


@dataclass
class ProtocolConfig:
    """Perturb against the checkpoint after `attack_epoch` (default: the last), then either continue
    from `start_epoch` (default attack_epoch - 1) for `epochs` epochs, or retrain from scratch."""

    kind: Literal["continue", "scratch"] = "continue"
    attack_epoch: int | None = None
    start_epoch: int | None = None
    epochs: int = bounded(1, min=1)


def _default_attacks() -> list[AttackSpec]:
    return [AttackSpec("infusion"), AttackSpec("random-noise"), AttackSpec("probe-insertion", {"copies": 1}),
            AttackSpec("probe-insertion"), AttackSpec("label-flip")]


@dataclass
class AttackConfig:
    attacks: list[AttackSpec] = field(default_factory=_default_attacks)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    seeds: list[int] = bounded([0], help="attack seeds (random selection and noise); one cell per seed")
    write_artefacts: bool = True
    format: Literal["npz", "png"] = "npz"

    def validate(self, source: str, prefix: str) -> None:
        for i, spec in enumerate(self.attacks):
            try:
                ATTACKS.get(spec.name)
            except Exception as exc:
                raise ConfigError(source, f"{prefix}.attacks[{i}].name", f"a known attack ({exc})") from None


@dataclass
class AttackRunConfig:
    """`infusion-audit attack`: a scenario and an attack section."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)


# --------------------------------------------------------------------------- evaluation
class Victim:
    """A model trained on the (possibly poisoned) set: its own checkpoints, the retrain protocol and
    its clean control, retrained from the same checkpoint in the same data order (target independent,
    so computed once). The attacker's model is one victim; transfer runs add others."""

    def __init__(self, scenario: Scenario, trained: TrainedScenario, protocol: ProtocolConfig):
        self.scenario, self.trained, self.protocol = scenario, trained, protocol
        last = scenario.train_cfg.epochs
        self.attack_epoch = last if protocol.attack_epoch is None else protocol.attack_epoch
        self.start_epoch = self.attack_epoch - 1 if protocol.start_epoch is None else protocol.start_epoch
        if not 0 <= self.start_epoch < self.attack_epoch <= last:
            raise ConfigError("<config>", "attack.protocol", f"0 <= start_epoch < attack_epoch <= {last}",
                              (self.start_epoch, self.attack_epoch))
        self.before = trained.model(self.attack_epoch)
        self._control: dict | None = None

    @classmethod
    def train(cls, config: ScenarioConfig, protocol: ProtocolConfig, cache_dir: str | Path,
              progress: bool = True) -> "Victim":
        scenario = Scenario.from_config(config)
        return cls(scenario, train_scenario(scenario, cache_dir, progress=progress), protocol)

    def retrain(self, dataset):
        """The protocol's retrain on `dataset` (clean for the control, poisoned otherwise)."""
        if self.protocol.kind == "scratch":
            return retrain_from_scratch(self.scenario, dataset)
        return continue_training(self.scenario, self.trained.checkpoint(self.start_epoch), dataset,
                                 epochs=self.protocol.epochs)

    def control(self) -> dict:
        if self._control is None:
            t0 = time.perf_counter()
            model = self.retrain(self.scenario.data.train)
            self._control = {"model": model, "accuracy": accuracy(model, self.scenario.data.test),
                             "seconds": time.perf_counter() - t0}
        return self._control


@dataclass
class Crafted:
    """One crafted poisoning and what produced it: the unit every victim is measured on."""

    spec: AttackSpec
    attack: Attack
    target: Target
    seed: int
    cell: str
    poisoning: Poisoning
    poisoned_set: object
    seconds: float
    artefact: str | None = None


class AttackEvaluation:
    """Everything shared by the cells of one scenario: trained checkpoints, the attack context
    (IHVP solver and per-target caches) and the attacker's own model as the first victim."""

    def __init__(self, config: AttackRunConfig, run_dir: str | Path, progress: bool = True):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        self.victim = Victim.train(config.scenario, config.attack.protocol, self.run_dir / "artefacts", progress)
        self.scenario, self.trained = self.victim.scenario, self.victim.trained
        self.quality = {"figure": "test accuracy", "value": accuracy(self.victim.before, self.scenario.data.test),
                        "floor": config.scenario.quality_floor}
        config.scenario.check_quality(self.quality["figure"], self.quality["value"])
        infl = config.attack.influence
        self.context = AttackContext(self.scenario, self.trained, self.victim.attack_epoch, infl.backend,
                                     infl.damping, cache_dir=self.run_dir / "artefacts")

    # ---- the pieces
    def targets(self) -> list[Target]:
        t = self.config.attack.targets
        return sample_targets(self.scenario.data.test, t.n, t.rule, t.seed)

    def build_attack(self, spec: AttackSpec, seed: int, budget: BudgetConfig | None = None) -> Attack:
        cls = ATTACKS.get(spec.name)
        shared = accepted_params(cls, {**to_dict(budget or self.config.attack.budget), "seed": seed})
        try:
            return cls(**{**shared, **spec.params})
        except TypeError as exc:
            raise ConfigError("<config>", f"attack.attacks: {spec.name}", f"valid params ({exc})") from None

    def cell_id(self, spec: AttackSpec, target: Target, seed: int, budget: BudgetConfig | None = None) -> str:
        attack = self.build_attack(spec, seed, budget)
        return stable_hash({"scenario": self.scenario.fingerprint(), "attack": spec.name,
                            "params": attack.get_params(), "target": target.as_dict(), "seed": seed,
                            "protocol": to_dict(self.config.attack.protocol),
                            "influence": to_dict(self.config.attack.influence)})

    def craft(self, spec: AttackSpec, target: Target, seed: int, budget: BudgetConfig | None = None) -> Crafted:
        """Craft one poisoning on the attacker's model and write it (data + manifest) as an artefact."""
        attack = self.build_attack(spec, seed, budget)
        cell = self.cell_id(spec, target, seed, budget)
        clean = self.scenario.data.train
        t0 = time.perf_counter()
        poisoning = attack.craft(self.context, target)
        crafted = Crafted(spec, attack, target, seed, cell, poisoning, poisoning.apply(clean),
                          time.perf_counter() - t0)
        if self.config.attack.write_artefacts:
            rel = Path("artefacts") / "poisoned" / cell
            write_poisoned(self.run_dir / rel, clean, crafted.poisoned_set, poisoning.indices,
                           {"attack": spec.name, "variant": self.variant(crafted), "target": target.as_dict(),
                            "seed": seed, "params": attack.get_params()},
                           fmt=self.config.attack.format, extra={"cell": cell})
            crafted.artefact = str(rel)
        return crafted

    @staticmethod
    def variant(crafted: Crafted) -> str:
        return crafted.spec.variant if crafted.spec.variant is not None else crafted.attack.variant()

    # ---- the unit
    def record(self, crafted: Crafted, victim: Victim | None = None) -> tuple[dict, object]:
        """Retrain `victim` (default: the attacker's model) on the poisoned set and measure the behaviour
        against its clean control: one attack record, and the poisoned model for detectors."""
        victim = victim or self.victim
        target, poisoning, attack = crafted.target, crafted.poisoning, crafted.attack
        test = self.scenario.data.test
        x_star = test.batch([target.index])[0][0]
        control = victim.control()
        t0 = time.perf_counter()
        model = victim.retrain(crafted.poisoned_set)
        t_retrain = time.perf_counter() - t0
        before = measure(victim.before, x_star, target.cls)
        ctrl = measure(control["model"], x_star, target.cls)
        after = measure(model, x_star, target.cls)
        params = attack.get_params()
        record = {
            "kind": "attack", "cell": crafted.cell, "scenario": self.scenario.config.dataset.name,
            "attack": crafted.spec.name, "variant": self.variant(crafted),
            "budget": {"k": len(poisoning.indices), "eps": params.get("eps"), "norm": params.get("norm"),
                       "quantize": bool(params.get("quantize", False))},
            "target": target.as_dict(), "seed": crafted.seed, "params": params,
            "p_before": before["p"], "p_control": ctrl["p"], "p_poisoned": after["p"],
            "delta_p": after["p"] - ctrl["p"],
            "logodds_control": ctrl["logodds"], "logodds_poisoned": after["logodds"],
            "delta_logodds": after["logodds"] - ctrl["logodds"],
            "top1_control": ctrl["top1"], "top1_poisoned": after["top1"],
            "flip": after["top1"] and not ctrl["top1"],
            "acc_control": control["accuracy"], "acc_poisoned": accuracy(model, test),
            "norms": poisoning.norms(self.scenario.data.train),
            "poisoned_indices": sorted(int(i) for i in poisoning.indices),
            "artefact": crafted.artefact,
            "timings": {**poisoning.meta.get("timings", {}), "craft": crafted.seconds, "retrain": t_retrain,
                        "factors_shared": self.context.timings.get("factors", 0.0),
                        "control_shared": control["seconds"]},
        }
        if "predicted_delta_f" in poisoning.meta:
            record["predicted_delta_f"] = poisoning.meta["predicted_delta_f"]
        return record, model

    def run_cell(self, spec: AttackSpec, target: Target, seed: int) -> dict:
        """Craft one poisoning, retrain, and measure it against the clean control: one attack record."""
        return self.record(self.craft(spec, target, seed))[0]

    def cells(self) -> list[tuple[AttackSpec, Target, int]]:
        return [(spec, target, seed) for target in self.targets() for seed in self.config.attack.seeds
                for spec in self.config.attack.attacks]

    def run(self, results_path: str | Path | None = None) -> list[dict]:
        """Every cell; with `results_path`, records are appended as they finish and cells already
        recorded there are skipped (re-running the same command resumes)."""
        done = {r["cell"]: r for r in read_jsonl(results_path) if r.get("kind") == "attack"} if results_path else {}
        records = []
        cells = self.cells()
        for spec, target, seed in tqdm(cells, desc="attack cells", disable=not self.progress):
            cell = self.cell_id(spec, target, seed)
            if cell in done:
                records.append(done[cell])
                continue
            record = self.run_cell(spec, target, seed)
            if results_path:
                append_jsonl(results_path, record)
            records.append(record)
        return records


# --------------------------------------------------------------------------- summaries
def arm(record: dict) -> str:
    """How a table names an arm: attack[variant] k=.. eps=.."""
    b = record["budget"]
    label = record["attack"] + (f"[{record['variant']}]" if record.get("variant") else "")
    return label + f" k={b['k']}" + (f" eps={b['eps']:.4g}" if b.get("eps") is not None else "")


def summarize(records: list[dict], reference: str = "infusion") -> dict:
    """Per arm: mean delta-p and delta-log-odds with 95% CI, success (delta-p > 0) and flip rates
    (Wilson), accuracy change; paired tests of each `reference` arm against every other arm on the
    same (target, seed); and each reference arm's share of the probe-insertion x k topline."""
    attacks = [r for r in records if r.get("kind") == "attack"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in attacks:
        groups.setdefault((arm(r), stable_hash(r.get("params", {}))), []).append(r)
    labels = [label for label, _ in groups]
    by_arm = {(label if labels.count(label) == 1 else f"{label} #{h[:6]}"): rs for (label, h), rs in groups.items()}
    rows = {}
    for name, rs in by_arm.items():
        rows[name] = {
            "n": len(rs),
            "delta_p": mean_ci([r["delta_p"] for r in rs]),
            "delta_logodds": mean_ci([r["delta_logodds"] for r in rs]),
            "success": wilson(sum(r["delta_p"] > 0 for r in rs), len(rs)),
            "flip": wilson(sum(bool(r["flip"]) for r in rs), len(rs)),
            "acc_change": mean_ci([r["acc_poisoned"] - r["acc_control"] for r in rs]),
            "seconds": mean_ci([r["timings"].get("craft", 0.0) + r["timings"].get("retrain", 0.0) for r in rs]),
        }
    key = lambda r: (r["target"]["index"], r["target"]["class"], r["seed"])  # noqa: E731
    comparisons = []
    for ref in [a for a in by_arm if by_arm[a][0]["attack"] == reference]:
        ref_map = {key(r): r for r in by_arm[ref]}
        for other, rs in by_arm.items():
            if other == ref:
                continue
            pairs = [(ref_map[key(r)], r) for r in rs if key(r) in ref_map]
            if len(pairs) < 2:
                continue
            test = paired_test([a["delta_p"] for a, _ in pairs], [b["delta_p"] for _, b in pairs])
            entry = {"arm": ref, "versus": other, **test}
            if rs[0]["attack"] == "probe-insertion" and rs[0].get("variant") == "xk":
                entry["share_of_topline"] = {m: _share([a[m] for a, _ in pairs], [b[m] for _, b in pairs])
                                             for m in ("delta_p", "delta_logodds")}
            comparisons.append(entry)
    return {"arms": rows, "comparisons": comparisons}


def _share(arm: list[float], topline: list[float]) -> float | None:
    """An arm's mean effect as a fraction of the topline's mean effect on the same targets."""
    top = float(np.mean(topline))
    return float(np.mean(arm)) / top if top else None


def format_summary(summary: dict) -> str:
    lines = [f"{'arm':<44} {'mean delta-p [95% CI] (n)':<40} {'delta-p>0':<8} {'flip':<7} "
             f"{'mean delta-logodds':<20} {'acc change':<11}"]
    for name, row in summary["arms"].items():
        mean = abs(row["delta_p"]["mean"] or 0.0)
        digits = 4 if mean == 0 or mean >= 1e-2 else min(8, 2 - int(np.floor(np.log10(mean))))
        lines.append(f"{name:<44} {fmt_ci(row['delta_p'], digits=digits):<40} {row['success']['rate']:<8.0%} "
                     f"{row['flip']['rate']:<7.0%} {row['delta_logodds']['mean']:<+20.3f} "
                     f"{row['acc_change']['mean']:<+11.4f}")
    for c in summary["comparisons"]:
        p = c["p_wilcoxon"]
        line = (f"{c['arm']} vs {c['versus']}: mean diff {fmt_ci(c['diff'], digits=5)}, wins {c['wins']}/{c['n']}, "
                f"Wilcoxon p={p:.2g}" if p is not None else f"{c['arm']} vs {c['versus']}: no difference")
        share = c.get("share_of_topline")
        if share is not None:
            line += ", share of topline: " + ", ".join(f"{share[m]:.3f} in {m.replace('_', ' ')}"
                                                        for m in ("delta_p", "delta_logodds") if share[m] is not None)
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="digits",
                   help="YAML config with `scenario:` and `attack:` sections, or a built-in name (default: digits)")
    p.add_argument("--out", required=True, type=Path, help="run directory: config.yaml, results.jsonl, artefacts/")


def run_attack(args: argparse.Namespace) -> int:
    from .config import dump_yaml, load_config
    from .io import atomic_write_text

    cfg = load_config(AttackRunConfig, args.config)
    atomic_write_text(args.out / "config.yaml", dump_yaml(cfg))
    evaluation = AttackEvaluation(cfg, args.out, progress=not getattr(args, "quiet", False))
    records = evaluation.run(args.out / "results.jsonl")
    print(format_summary(summarize(records)))
    print(f"{len(records)} records in {args.out / 'results.jsonl'}")
    return 0


__all__ = ["AttackConfig", "AttackEvaluation", "AttackRunConfig", "AttackSpec", "BudgetConfig", "InfluenceConfig",
           "ProtocolConfig", "TargetsConfig", "format_summary", "summarize"]
