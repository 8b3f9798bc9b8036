"""The attack protocol, one code path for every pipeline (images, text, a user's own): the attacker crafts a
poisoning against its trained checkpoint, a victim retrains on the poisoned set, and the behaviour is
measured against the victim's clean control, retrained from the same checkpoint in the same data order
(training is deterministic, so control and poisoned retrains differ only by the poison).

`Attacker` owns what the attacker has and does (the trained pipeline, the `AttackContext` at the attack
epoch, building each arm's attack, crafting, the poisoned artefacts); `Victim` owns a retrain and its
control; `Attacker.measure` turns one crafted poisoning on one victim into an attack record. The grid of
cells that runs them (`attack` and `bench` alike) is `grid.Grid`.

Record timings: `factors_shared` is paid once per pipeline and `control_shared` once per protocol;
`ihvp` and `scores` once per target (arms on the same target reuse them); `select`, `pgd`, `craft`
(all of the attack's own work) and `retrain` are this cell's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .attacks.base import Attack, AttackContext, Poisoning, accepted_params
from .backdoor import is_backdoor
from .behaviour import already_shown
from .config import AttackSpec, AuditConfig, BudgetConfig, PipelineConfig, ProtocolConfig, to_dict
from .errors import ConfigError, UserError
from .io import stable_hash
from .pipeline import Pipeline, TrainedPipeline, train_pipeline
from .registry import ATTACKS
from .results import AttackRecord, EffectRecord
from .segment import Segment
from .training import Retrained


class Victim:
    """A model trained by `pipeline` that retrains on a (possibly poisoned) set by the protocol: from the
    checkpoint after `start_epoch` for `epochs` epochs in the same data order, from scratch, or the last
    `steps` of training replayed (`segment`), under its mitigation when it has one. Its clean control is the
    same retrain on the clean set (target independent, so computed once). The attacker's own pipeline is the
    main victim; transfer victims train their own."""

    def __init__(self, pipeline: Pipeline, trained: TrainedPipeline, protocol: ProtocolConfig, mitigation=None):
        self.pipeline, self.trained, self.protocol, self.mitigation = pipeline, trained, protocol, mitigation
        if mitigation is not None:
            mitigation.check_fit(pipeline.fit)  # a loop it cannot wrap is refused before any training
        self.segment = Segment(pipeline, trained, protocol.steps) if protocol.kind == "segment" else None
        last = pipeline.train_cfg.epochs
        self.attack_epoch = last if protocol.attack_epoch is None else protocol.attack_epoch
        self.start_epoch = self.attack_epoch - 1 if protocol.start_epoch is None else protocol.start_epoch
        if not 0 <= self.start_epoch < self.attack_epoch <= last:
            raise ConfigError("<config>", "attack.protocol", f"0 <= start_epoch < attack_epoch <= {last}",
                              (self.start_epoch, self.attack_epoch))
        self._control: dict | None = None

    @classmethod
    def train(cls, config: PipelineConfig, protocol: ProtocolConfig, cache_dir: str | Path,
              progress: bool = True) -> "Victim":
        pipeline = Pipeline.from_config(config)
        return cls(pipeline, train_pipeline(pipeline, cache_dir, progress=progress), protocol)

    @cached_property
    def before(self):
        """The victim's model at the attack epoch, before any retrain: the records' `*_before` figures."""
        return self.trained.model(self.attack_epoch)

    def retrain(self, dataset) -> Retrained:
        """The protocol's retrain on `dataset` (clean for the control, poisoned otherwise), under the victim's
        mitigation when it has one (with the mitigation's own figures)."""
        if self.segment is not None:
            return Retrained(self.segment.retrain(dataset))
        start = None if self.protocol.kind == "scratch" else self.trained.checkpoint(self.start_epoch)
        epochs = None if start is None else self.protocol.epochs
        if self.mitigation is not None:
            return self.mitigation.retrain(self.pipeline.fit, self.pipeline.new_model, dataset, start, epochs)
        if start is None:
            return Retrained(self.pipeline.retrain_from_scratch(dataset))
        return Retrained(self.pipeline.continue_training(start, dataset, epochs=epochs))

    def retrain_start(self):
        """The checkpoint a retrain starts from (model and optimizer state): the segment's start, the continued
        epoch's checkpoint, or None when the victim retrains from scratch."""
        if self.segment is not None:
            return self.segment.start()
        return None if self.protocol.kind == "scratch" else self.trained.checkpoint(self.start_epoch)

    def quality(self, model) -> float:
        """The pipeline's task figure on the test set (accuracy for images): the records' `acc_*` columns."""
        return self.pipeline.quality(model)[1]

    def control(self) -> dict:
        if self._control is None:
            t0 = time.perf_counter()
            model = self.retrain(self.pipeline.data.train).model
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

    @property
    def variant(self) -> str:
        """How tables tell this arm apart: the arm's own label, else the attack's (e.g. quantized / float)."""
        return self.spec.variant if self.spec.variant is not None else self.attack.variant()


class Attacker:
    """What the attacker has and does: the pipeline trained by its recipe (checkpoints shared by every cell),
    the `AttackContext` at the attack epoch (the attacker's model, the IHVP solver and per-target caches),
    and, per cell, the arm's attack, the crafted poisoning and its artefact."""

    def __init__(self, config: AuditConfig, run_dir: str | Path, progress: bool = True):
        self.config, self.run_dir = config, Path(run_dir)
        if config.influence.backend == "projected":
            raise UserError("influence.backend projected serves detectors at scale; an attacker needs ekfac or exact")
        self.pipeline = Pipeline.from_config(config.pipeline)
        self.trained = train_pipeline(self.pipeline, self.run_dir / "artefacts", progress=progress)
        self.victim = Victim(self.pipeline, self.trained, config.attack.protocol)  # the main victim: the same pipeline
        figure, value = self.pipeline.quality(self.victim.before)
        self.quality = {"figure": figure, "value": value, "floor": config.pipeline.quality_floor}
        config.pipeline.check_quality(figure, value)
        self.context = AttackContext(self.pipeline, self.trained, self.victim.attack_epoch, config.influence,
                                     cache_dir=self.run_dir / "artefacts", probes=config.attack.targets.probes,
                                     progress=progress,
                                     documents=None if self.victim.segment is None else self.victim.segment.documents,
                                     retrain_start=self.victim.retrain_start)
        self._sources: dict[str, Poisoning] = {}  # cell -> poisoning another arm copies (`like`)

    def targets(self) -> list:
        t = self.config.attack.targets
        return self.pipeline.targets(t.n, t.rule, t.seed, t.pairs, t.probes, t.measure)

    def shown_targets(self) -> list[str]:
        """For each target the trained model already shows before any attack, a line saying so (a config check
        cannot know it for a model trained from scratch). A backdoor target has no trigger until an arm binds
        one: its control's ASR is measured in every record instead."""
        model = self.victim.before
        return [f"the trained model: {line}" for target in self.targets() if not is_backdoor(target)
                and (line := already_shown(self.context.behaviour(target), model)) is not None]

    def build_attack(self, spec: AttackSpec, seed: int, budget: BudgetConfig, repeat: int = 0) -> Attack:
        """The arm's attack for a cell: the shared budget's keys it takes, the cell's attack seed (a repeat's
        own: seed * repeats + repeat) and the arm's own params."""
        cls = ATTACKS.get(spec.name)
        shared = accepted_params(cls, {**to_dict(budget), "seed": seed * spec.repeats + repeat})
        try:
            return cls(**{**shared, **spec.params})
        except TypeError as exc:
            raise ConfigError("<config>", f"attack.attacks: {spec.name}", f"valid params ({exc})") from None

    @staticmethod
    def bind(spec: AttackSpec, attack: Attack, target):
        """The target a cell attacks: a backdoor target with its arm's trigger (the arm's own, else its attack's);
        any other target as it is."""
        if not is_backdoor(target):
            return target
        trigger = spec.trigger or attack.trigger
        if trigger is None:
            raise ConfigError("<config>", f"attack.attacks: {spec.name}", "a trigger for the backdoor targets (this "
                              "attack has none of its own), e.g. trigger: {kind: patch, size: 3}")
        return target.bind(trigger)

    def cell_key(self, spec: AttackSpec, target, seed: int, budget: BudgetConfig, repeat: int = 0) -> str:
        """The cell's key in results.jsonl and under artefacts/: everything its records depend on."""
        attack = self.build_attack(spec, seed, budget, repeat)
        target = self.bind(spec, attack, target)
        return stable_hash({"scenario": self.pipeline.fingerprint(), "attack": spec.name,  # schema-1 key names
                            "params": attack.get_params(), "target": target.as_dict(), "seed": seed,
                            "protocol": self.config.attack.protocol.identity(),
                            "influence": self.config.influence.identity(),
                            **({"probes": self.config.attack.targets.probes} if self.pipeline.kind == "text" else {}),
                            **({"repeat": repeat} if repeat else {})})

    def source_spec(self, spec: AttackSpec) -> AttackSpec | None:
        """The arm whose poisoning `spec` copies (its attack's `like` param), or None."""
        like = self.build_attack(spec, 0, self.config.attack.budget).get_params().get("like")
        if like is None:
            return None
        for other in self.config.attack.attacks:
            if other.name == like:
                return other
        raise ConfigError("<config>", f"attack.attacks: {spec.name}", f"an arm named {like!r} to copy (like)", like)

    @cached_property
    def copied(self) -> list[AttackSpec]:
        """The arms another arm copies: their poisonings are kept for it."""
        return [source for source in map(self.source_spec, self.config.attack.attacks) if source is not None]

    def craft(self, spec: AttackSpec, target, seed: int, budget: BudgetConfig, repeat: int = 0) -> Crafted:
        """Craft one poisoning on the attacker's model and write it (data + manifest) as an artefact. An arm
        that copies another's documents (`like`) gets that arm's poisoning of the same target and seed."""
        attack = self.build_attack(spec, seed, budget, repeat)
        cell = self.cell_key(spec, target, seed, budget, repeat)
        bound = self.bind(spec, attack, target)
        clean = self.pipeline.data.train
        source = self.source_spec(spec)
        t0 = time.perf_counter()
        if source is None:
            poisoning = attack.craft(self.context, bound)
        else:
            poisoning = attack.craft(self.context, bound, like=self.source_poisoning(source, target, seed, budget))
        crafted = Crafted(spec, attack, bound, seed, cell, poisoning, poisoning.apply(clean),
                          time.perf_counter() - t0, repeat=repeat)
        if spec in self.copied:
            self._sources[cell] = poisoning
        if self.config.attack.write_artefacts:
            rel = Path("artefacts") / "poisoned" / cell
            meta = {"attack": spec.name, "variant": crafted.variant, "target": bound.as_dict(),
                    "seed": seed, "params": attack.get_params()}
            write_artefact(self.run_dir / rel, clean, crafted.poisoned_set, poisoning.indices, meta,
                           fmt=self.config.attack.format, extra={"cell": cell})
            crafted.artefact = str(rel)
        return crafted

    def source_poisoning(self, spec: AttackSpec, target, seed: int, budget: BudgetConfig) -> Poisoning:
        """The poisoning `spec` crafted for this cell, crafted now if this process has not (it is deterministic)."""
        cell = self.cell_key(spec, target, seed, budget)
        if cell not in self._sources:
            self._sources[cell] = self.craft(spec, target, seed, budget).poisoning
        return self._sources[cell]

    def measure(self, crafted: Crafted, on: Victim, kind: type[EffectRecord] = AttackRecord,
                timings: dict | None = None, **fields) -> tuple[EffectRecord, Retrained]:
        """Retrain victim `on` on the poisoned set and measure the behaviour against its clean control: a record of
        `kind` (an attack record; a mitigation record for a mitigated victim, with the mitigation's `figures`),
        and what the retrain produced (the poisoned model, for detectors). `fields` name the victim, the
        variant (a transfer victim's) and a mitigation's own fields; `timings` add to the measured ones."""
        target, poisoning, attack = crafted.target, crafted.poisoning, crafted.attack
        behaviour = self.context.behaviour(target)
        control = on.control()
        t0 = time.perf_counter()
        retrained = on.retrain(crafted.poisoned_set)
        t_retrain = time.perf_counter() - t0
        params = attack.get_params()
        if on.mitigation is not None:  # its figures, and those about the target input (a certified radius)
            at = getattr(behaviour, "x", None)
            fields["figures"] = {**retrained.figures,
                                 **(retrained.figures_at(torch.as_tensor(at)) if at is not None else {})}
        fields = {"variant": crafted.variant, **fields}
        record = kind.from_figures(
            behaviour.figures(on.before), behaviour.figures(control["model"]), behaviour.figures(retrained.model),
            domain=self.pipeline.kind, cell=crafted.cell, dataset=self.pipeline.config.dataset.name,
            attack=crafted.spec.name,
            budget={"k": len(poisoning.indices), "eps": params.get("eps"), "norm": params.get("norm"),
                    "quantize": bool(params.get("quantize", False)),
                    **({"tokens": params["tokens"]} if params.get("tokens") is not None else {}),
                    **({"trigger": target.trigger.label()} if is_backdoor(target) else {})},
            target=target.as_dict(), seed=crafted.seed, params=params,
            repeat=crafted.repeat if crafted.spec.repeats > 1 else None,
            acc_control=control["accuracy"], acc_poisoned=on.quality(retrained.model),
            norms=poisoning.norms(self.pipeline.data.train),
            poisoned_indices=sorted(int(i) for i in poisoning.indices), artefact=crafted.artefact,
            timings={**poisoning.meta.get("timings", {}), "craft": crafted.seconds, "retrain": t_retrain,
                     "factors_shared": self.context.timings.get("factors", 0.0), "control_shared": control["seconds"],
                     **(timings or {})},
            predicted_delta_f=poisoning.meta.get("predicted_delta_f"), **fields)
        return record, retrained


def write_artefact(out_dir: Path, clean, poisoned, indices, config: dict, fmt: str, extra: dict) -> Path:
    """Write a poisoned set in its modality's format (images: npz or PNG; text: JSON lines) and its manifest."""
    if getattr(clean, "kind", "image") == "text":
        from .text.data import write_poisoned_text

        return write_poisoned_text(out_dir, clean, poisoned, indices, config, extra=extra)
    from .data import write_poisoned

    return write_poisoned(out_dir, clean, poisoned, indices, config, fmt=fmt, extra=extra)
