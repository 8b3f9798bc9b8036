"""Honest attack evaluation, one code path for every pipeline (images, text, a user's own): craft each
(attack, target, seed) cell, retrain per the protocol, and measure the behaviour against a clean control
retrained from the same checkpoint in the same data order (training is deterministic, so control and
poisoned runs differ only by the poison).

`AttackEvaluation.run_cell` is the unit (one record); `run` loops it, appending to results.jsonl and
skipping cells already there; `summarize` gives means with 95% CIs and paired tests between attacks.

Record timings: `factors_shared` is paid once per scenario and `control_shared` once per protocol;
`ihvp` and `scores` once per target (arms on the same target reuse them); `select`, `pgd`, `craft`
(all of the attack's own work) and `retrain` are this cell's.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .attacks.base import Attack, AttackContext, Poisoning, accepted_params
from .config import ScenarioConfig, bounded, to_dict
from .errors import ConfigError
from .io import append_jsonl, read_jsonl, stable_hash
from .mitigations.base import Mitigated
from .pipeline import Pipeline, TrainedPipeline, pipeline_kind, train_pipeline
from .registry import ATTACKS
from .stats import fmt_ci, mean_ci, paired_test, wilson

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config
@dataclass
class AttackSpec:
    """One attack arm: a registered attack, its own params (over the shared budget), a table label, and how
    many times each cell runs it with its own attack seed (`repeats`, paired with other arms by their mean)."""

    name: str
    params: dict = field(default_factory=dict)
    variant: str | None = None
    repeats: int = bounded(1, min=1)


@dataclass
class TargetsConfig:
    """The behaviours attacked, as the pipeline defines them. Images: `n` seeded test images, `rule`
    random-other (one class != label each) or all-classes. Text: `pairs` ([shift, target_shift] on Caesar,
    every ordered pair when empty; [word_a, word_b] on any other corpus), each measured on `probes` prompts."""

    n: int = bounded(30, min=1)
    rule: Literal["random-other", "all-classes"] = "random-other"
    seed: int = 0
    pairs: list[list[int | str]] = bounded([], help="text: [shift, target_shift] or [word_a, word_b] pairs")
    probes: int = bounded(32, min=1, help="text: test prompts each behaviour is measured on")


@dataclass
class BudgetConfig:
    """Shared by every attack that takes the key: k documents (count, or fraction of the train set)."""

    k: int | float = 0.01
    eps: float = bounded(1 / 16, gt=0)
    norm: Literal["linf", "l2"] = "linf"
    quantize: bool = True
    tokens: int = bounded(2, min=1, help="text: tokens changed per document at most")

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


DEFAULT_ATTACKS = {  # the arms an attack section without `attacks` runs, by the kind of data
    "image": [AttackSpec("infusion"), AttackSpec("random-noise"), AttackSpec("probe-insertion", {"copies": 1}),
              AttackSpec("probe-insertion"), AttackSpec("label-flip")],
    "text": [AttackSpec("infusion-text"), AttackSpec("random-tokens"), AttackSpec("probe-insertion-text")],
}


@dataclass
class AttackConfig:
    attacks: list[AttackSpec] = field(default_factory=list, metadata={
        "help": "the arms (default: Infusion and the baselines for the scenario's kind of data)"})
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

    def validate(self, source: str, prefix: str) -> None:
        resolve_attacks(self.scenario, self.attack, source)


def resolve_attacks(scenario: ScenarioConfig, attack: AttackConfig, source: str) -> None:
    """Fill in the default arms for the scenario's kind of data when none are listed, and check that every
    arm edits that kind of data (before any training)."""
    kind = pipeline_kind(scenario)
    if not attack.attacks:
        attack.attacks = copy.deepcopy(DEFAULT_ATTACKS[kind])
    for i, spec in enumerate(attack.attacks):
        kinds = ATTACKS.get(spec.name).data_kinds
        if kind not in kinds:
            raise ConfigError(source, f"attack.attacks[{i}]", f"an attack that edits {kind} data "
                              f"({spec.name} edits {', '.join(sorted(kinds))})", spec.name)


# --------------------------------------------------------------------------- evaluation
class Victim:
    """A model trained on the (possibly poisoned) set: its own checkpoints, the retrain protocol and
    its clean control, retrained from the same checkpoint in the same data order (target independent,
    so computed once). The attacker's model is one victim; transfer runs add others."""

    def __init__(self, scenario: Pipeline, trained: TrainedPipeline, protocol: ProtocolConfig, mitigation=None):
        self.scenario, self.trained, self.protocol, self.mitigation = scenario, trained, protocol, mitigation
        if mitigation is not None:
            mitigation.check_fit(scenario.fit)  # a loop it cannot wrap is refused before any training
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
        scenario = Pipeline.from_config(config)
        return cls(scenario, train_pipeline(scenario, cache_dir, progress=progress), protocol)

    def train_on(self, dataset) -> Mitigated:
        """The protocol's retrain on `dataset` (clean for the control, poisoned otherwise), under the victim's
        mitigation when it has one (with the mitigation's own figures)."""
        start = None if self.protocol.kind == "scratch" else self.trained.checkpoint(self.start_epoch)
        epochs = None if start is None else self.protocol.epochs
        if self.mitigation is not None:
            return self.mitigation.retrain(self.scenario.fit, self.scenario.new_model, dataset, start, epochs)
        if start is None:
            return Mitigated(self.scenario.retrain_from_scratch(dataset))
        return Mitigated(self.scenario.continue_training(start, dataset, epochs=epochs))

    def retrain(self, dataset):
        return self.train_on(dataset).model

    def quality(self, model) -> float:
        """The pipeline's task figure on the test set (accuracy for images): the records' `acc_*` columns."""
        return self.scenario.quality(model)[1]

    def control(self) -> dict:
        if self._control is None:
            t0 = time.perf_counter()
            model = self.retrain(self.scenario.data.train)
            self._control = {"model": model, "accuracy": self.quality(model), "seconds": time.perf_counter() - t0}
        return self._control


@dataclass
class Crafted:
    """One crafted poisoning and what produced it: the unit every victim is measured on."""

    spec: AttackSpec
    attack: Attack
    target: object
    seed: int
    cell: str
    poisoning: Poisoning
    poisoned_set: object
    seconds: float
    artefact: str | None = None
    repeat: int = 0


class AttackEvaluation:
    """Everything shared by the cells of one scenario: trained checkpoints, the attack context
    (IHVP solver and per-target caches) and the attacker's own model as the first victim."""

    def __init__(self, config: AttackRunConfig, run_dir: str | Path, progress: bool = True):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        resolve_attacks(config.scenario, config.attack, "<config>")
        self.victim = Victim.train(config.scenario, config.attack.protocol, self.run_dir / "artefacts", progress)
        self.scenario, self.trained = self.victim.scenario, self.victim.trained
        figure, value = self.scenario.quality(self.victim.before)
        self.quality = {"figure": figure, "value": value, "floor": config.scenario.quality_floor}
        config.scenario.check_quality(figure, value)
        infl = config.attack.influence
        self.context = AttackContext(self.scenario, self.trained, self.victim.attack_epoch, infl.backend,
                                     infl.damping, cache_dir=self.run_dir / "artefacts",
                                     probes=config.attack.targets.probes)
        self._sources: dict[str, Poisoning] = {}  # cell -> poisoning another arm copies (`like`)

    # ---- the pieces
    def targets(self) -> list:
        t = self.config.attack.targets
        return self.scenario.targets(t.n, t.rule, t.seed, t.pairs, t.probes)

    def build_attack(self, spec: AttackSpec, seed: int, budget: BudgetConfig | None = None, repeat: int = 0) -> Attack:
        """The arm's attack for a cell: the shared budget's keys it takes, the cell's attack seed (a repeat's
        own: seed * repeats + repeat) and the arm's own params."""
        cls = ATTACKS.get(spec.name)
        shared = accepted_params(cls, {**to_dict(budget or self.config.attack.budget),
                                       "seed": seed * spec.repeats + repeat})
        try:
            return cls(**{**shared, **spec.params})
        except TypeError as exc:
            raise ConfigError("<config>", f"attack.attacks: {spec.name}", f"valid params ({exc})") from None

    def cell_id(self, spec: AttackSpec, target, seed: int, budget: BudgetConfig | None = None, repeat: int = 0) -> str:
        attack = self.build_attack(spec, seed, budget, repeat)
        return stable_hash({"scenario": self.scenario.fingerprint(), "attack": spec.name,
                            "params": attack.get_params(), "target": target.as_dict(), "seed": seed,
                            "protocol": to_dict(self.config.attack.protocol),
                            "influence": to_dict(self.config.attack.influence),
                            **({"probes": self.config.attack.targets.probes} if self.scenario.kind == "text" else {}),
                            **({"repeat": repeat} if repeat else {})})

    @cached_property
    def copied(self) -> list[AttackSpec]:
        """The arms another arm copies: their poisonings are kept for it."""
        return [source for source in map(self.source_spec, self.config.attack.attacks) if source is not None]

    def source_spec(self, spec: AttackSpec) -> AttackSpec | None:
        """The arm whose poisoning `spec` copies (its attack's `like` param), or None."""
        like = self.build_attack(spec, 0).get_params().get("like")
        if like is None:
            return None
        for other in self.config.attack.attacks:
            if other.name == like:
                return other
        raise ConfigError("<config>", f"attack.attacks: {spec.name}", f"an arm named {like!r} to copy (like)", like)

    def craft(self, spec: AttackSpec, target, seed: int, budget: BudgetConfig | None = None,
              repeat: int = 0) -> Crafted:
        """Craft one poisoning on the attacker's model and write it (data + manifest) as an artefact. An arm
        that copies another's documents (`like`) gets that arm's poisoning of the same target and seed."""
        attack = self.build_attack(spec, seed, budget, repeat)
        cell = self.cell_id(spec, target, seed, budget, repeat)
        clean = self.scenario.data.train
        source = self.source_spec(spec)
        t0 = time.perf_counter()
        if source is None:
            poisoning = attack.craft(self.context, target)
        else:
            poisoning = attack.craft(self.context, target, like=self.source_poisoning(source, target, seed, budget))
        crafted = Crafted(spec, attack, target, seed, cell, poisoning, poisoning.apply(clean),
                          time.perf_counter() - t0, repeat=repeat)
        if spec in self.copied:
            self._sources[cell] = poisoning
        if self.config.attack.write_artefacts:
            rel = Path("artefacts") / "poisoned" / cell
            meta = {"attack": spec.name, "variant": self.variant(crafted), "target": target.as_dict(),
                    "seed": seed, "params": attack.get_params()}
            write_artefact(self.run_dir / rel, clean, crafted.poisoned_set, poisoning.indices, meta,
                           fmt=self.config.attack.format, extra={"cell": cell})
            crafted.artefact = str(rel)
        return crafted

    def source_poisoning(self, spec: AttackSpec, target, seed: int, budget: BudgetConfig | None) -> Poisoning:
        """The poisoning `spec` crafted for this cell, crafted now if this process has not (it is deterministic)."""
        cell = self.cell_id(spec, target, seed, budget)
        if cell not in self._sources:
            self._sources[cell] = self.craft(spec, target, seed, budget).poisoning
        return self._sources[cell]

    @staticmethod
    def variant(crafted: Crafted) -> str:
        return crafted.spec.variant if crafted.spec.variant is not None else crafted.attack.variant()

    # ---- the unit
    def record(self, crafted: Crafted, victim: Victim | None = None) -> tuple[dict, object]:
        """Retrain `victim` (default: the attacker's model) on the poisoned set and measure the behaviour
        against its clean control: one attack record, and the poisoned model for detectors."""
        victim = victim or self.victim
        target, poisoning, attack = crafted.target, crafted.poisoning, crafted.attack
        behaviour = self.context.behaviour(target)
        control = victim.control()
        t0 = time.perf_counter()
        mitigated = victim.train_on(crafted.poisoned_set)
        model = mitigated.model
        t_retrain = time.perf_counter() - t0
        before = behaviour.figures(victim.before)
        ctrl = behaviour.figures(control["model"])
        after = behaviour.figures(model)
        params = attack.get_params()
        record = {
            "kind": "attack", "domain": self.scenario.kind, "cell": crafted.cell,
            "scenario": self.scenario.config.dataset.name, "attack": crafted.spec.name, "variant": self.variant(crafted),
            "budget": {"k": len(poisoning.indices), "eps": params.get("eps"), "norm": params.get("norm"),
                       "quantize": bool(params.get("quantize", False)),
                       **({"tokens": params["tokens"]} if params.get("tokens") is not None else {})},
            "target": target.as_dict(), "seed": crafted.seed, "params": params,
            **({"repeat": crafted.repeat} if crafted.spec.repeats > 1 else {}),
            "p_before": before["p"], "p_control": ctrl["p"], "p_poisoned": after["p"],
            "delta_p": after["p"] - ctrl["p"],
            "logodds_control": ctrl["logodds"], "logodds_poisoned": after["logodds"],
            "delta_logodds": after["logodds"] - ctrl["logodds"],
            "top1_control": ctrl["top1"], "top1_poisoned": after["top1"],
            "flip": after["top1"] and not ctrl["top1"],
            **{f"{key}_{name}": figures[key] for key in sorted(set(after) - {"p", "logodds", "top1"})
               for name, figures in (("before", before), ("control", ctrl), ("poisoned", after))},
            "acc_control": control["accuracy"], "acc_poisoned": victim.quality(model),
            "norms": poisoning.norms(self.scenario.data.train),
            "poisoned_indices": sorted(int(i) for i in poisoning.indices),
            "artefact": crafted.artefact,
            "timings": {**poisoning.meta.get("timings", {}), "craft": crafted.seconds, "retrain": t_retrain,
                        "factors_shared": self.context.timings.get("factors", 0.0),
                        "control_shared": control["seconds"]},
        }
        if "predicted_delta_f" in poisoning.meta:
            record["predicted_delta_f"] = poisoning.meta["predicted_delta_f"]
        if victim.mitigation is not None:  # its figures, and those about the target input (a certified radius)
            at = getattr(behaviour, "x", None)
            record["figures"] = {**mitigated.figures,
                                 **(mitigated.figures_at(torch.as_tensor(at)) if at is not None else {})}
        return record, model

    def run_cell(self, spec: AttackSpec, target, seed: int, repeat: int = 0) -> dict:
        """Craft one poisoning, retrain, and measure it against the clean control: one attack record."""
        return self.record(self.craft(spec, target, seed, repeat=repeat))[0]

    def cells(self) -> list[tuple[AttackSpec, object, int, int]]:
        """(arm, target, seed, repeat) in run order: an arm another copies comes first in its target and seed."""
        specs = sorted(self.config.attack.attacks, key=lambda s: self.source_spec(s) is not None)
        return [(spec, target, seed, repeat) for target in self.targets() for seed in self.config.attack.seeds
                for spec in specs for repeat in range(spec.repeats)]

    def run(self, results_path: str | Path | None = None) -> list[dict]:
        """Every cell; with `results_path`, records are appended as they finish and cells already
        recorded there are skipped (re-running the same command resumes)."""
        done = {r["cell"]: r for r in read_jsonl(results_path) if r.get("kind") == "attack"} if results_path else {}
        records = []
        cells = self.cells()
        for spec, target, seed, repeat in tqdm(cells, desc="attack cells", disable=not self.progress):
            cell = self.cell_id(spec, target, seed, repeat=repeat)
            if cell in done:
                records.append(done[cell])
                continue
            record = self.run_cell(spec, target, seed, repeat)
            if results_path:
                append_jsonl(results_path, record)
            records.append(record)
        return records


def write_artefact(out_dir: Path, clean, poisoned, indices, config: dict, fmt: str, extra: dict) -> Path:
    """Write a poisoned set in its modality's format (images: npz or PNG; text: JSON lines) and its manifest."""
    if getattr(clean, "kind", "image") == "text":
        from .text.data import write_poisoned_text

        return write_poisoned_text(out_dir, clean, poisoned, indices, config, extra=extra)
    from .data import write_poisoned

    return write_poisoned(out_dir, clean, poisoned, indices, config, fmt=fmt, extra=extra)


# --------------------------------------------------------------------------- summaries
def arm(record: dict) -> str:
    """How a table names an arm: attack[variant] k=.. eps=.."""
    b = record["budget"]
    label = record["attack"] + (f"[{record['variant']}]" if record.get("variant") else "")
    return label + f" k={b['k']}" + (f" eps={b['eps']:.4g}" if b.get("eps") is not None else "")


def summarize(records: list[dict], reference: str | None = None) -> dict:
    """Per arm: mean delta-p and delta-log-odds with 95% CI, success (delta-p > 0) and flip rates
    (Wilson), accuracy change; paired tests in delta-log-odds (the report's measure) of each `reference`
    arm (default: infusion, or infusion-text on text) against every other arm on the same (target, seed),
    an arm's repeats paired by their mean; and each reference arm's share of the probe-insertion x k topline."""
    attacks = [r for r in records if r.get("kind") == "attack"]
    if reference is None:
        reference = "infusion-text" if any(r.get("domain") == "text" for r in attacks) else "infusion"
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in attacks:
        params = {k: v for k, v in r.get("params", {}).items() if k != "seed"}  # seeds and repeats: one arm
        groups.setdefault((arm(r), stable_hash(params)), []).append(r)
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
    comparisons = []
    for ref in [a for a in by_arm if by_arm[a][0]["attack"] == reference]:
        ref_cells = _by_cell(by_arm[ref])
        for other, rs in by_arm.items():
            if other == ref:
                continue
            cells = _by_cell(rs)
            shared = [c for c in cells if c in ref_cells]
            if len(shared) < 2:
                continue
            mean = lambda group, m: float(np.mean([r[m] for r in group]))  # noqa: E731
            test = paired_test([mean(ref_cells[c], "delta_logodds") for c in shared],
                               [mean(cells[c], "delta_logodds") for c in shared])
            entry = {"arm": ref, "versus": other, **test}
            if rs[0]["attack"] == "probe-insertion" and rs[0].get("variant") == "xk":
                entry["share_of_topline"] = {m: _share([mean(ref_cells[c], m) for c in shared],
                                                       [mean(cells[c], m) for c in shared])
                                             for m in ("delta_p", "delta_logodds")}
            comparisons.append(entry)
    return {"arms": rows, "comparisons": comparisons}


def _by_cell(records: list[dict]) -> dict[str, list[dict]]:
    """Records by (target, seed): the unit arms are paired on (an arm's repeats share one)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(stable_hash({"target": r["target"], "seed": r["seed"]}), []).append(r)
    return out


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
        line = (f"{c['arm']} vs {c['versus']}: mean diff in delta-logodds {fmt_ci(c['diff'], digits=3)}, "
                f"wins {c['wins']}/{c['n']}, "
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
    cfg.scenario = cfg.scenario.on_device(getattr(args, "device", None))  # config.yaml records the device used
    atomic_write_text(args.out / "config.yaml", dump_yaml(cfg))
    evaluation = AttackEvaluation(cfg, args.out, progress=not getattr(args, "quiet", False))
    records = evaluation.run(args.out / "results.jsonl")
    print(format_summary(summarize(records)))
    print(f"{len(records)} records in {args.out / 'results.jsonl'}")
    return 0


__all__ = ["AttackConfig", "AttackEvaluation", "AttackRunConfig", "AttackSpec", "BudgetConfig", "InfluenceConfig",
           "ProtocolConfig", "TargetsConfig", "format_summary", "summarize"]
