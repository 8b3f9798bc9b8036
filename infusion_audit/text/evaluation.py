"""Honest evaluation of text attacks on the Caesar scenario: craft, retrain, compare with a clean control.

Protocol (the paper's): the attack sees the model after the last epoch E; the poisoned corpus and an
unedited control each continue from checkpoint E-1 for one epoch with the same seed and data order,
so the difference between them is the edit's. `CaesarEvaluation.run_unit` runs every attack arm of one
(target, seed), Infusion first, scans the poisoned corpora and returns the records in the shared results
schema (domain "text"); the poisoned corpora and their manifests are written under artefacts/.
`infusion_audit.text.bench.run_text_bench` runs the grid of units.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import ScenarioConfig, bounded, load_config, to_dict
from ..errors import ConfigError, UserError
from ..influence import influence_scores, make_ihvp
from ..io import stable_hash
from ..registry import ATTACKS
from ..stats import mean_ci, paired_test, wilson
from ..training import continue_training
from .attacks import TextAttackContext, TextPoisoning
from .behaviours import (CaesarTarget, CompletionBehaviour, caesar_behaviour, caesar_explicit_documents,
                         measurement_gradient)
from .data import CaesarDocument, TextDataset, write_poisoned_text
from .models import lm_loss
from .scenario import TextScenario, decryption_accuracy, train_text_scenario

log = logging.getLogger(__name__)

TEXT_ATTACKS = ("infusion-text", "random-tokens", "probe-insertion-text")
TEXT_DETECTORS = ("token-surprisal", "token-diff", "loss-outlier", "spectral-signature", "activation-clustering",
                  "text-influence")


@dataclass
class TextAttackConfig:
    """The attack grid on a Caesar scenario: which attacks, their budget, the influence solver, the targets."""

    attacks: list[str] = bounded(list(TEXT_ATTACKS))
    k: int = bounded(40, min=1, help="documents edited (the same for every attack)")
    budget: int = bounded(2, min=1, help="tokens changed per document at most (padding never counts)")
    optimizer: Literal["gcg", "relaxed"] = "gcg"
    steps: int = bounded(20, min=1, help="optimiser steps (gcg: token swaps tried, stopping early at no gain)")
    candidates: int = bounded(64, min=1, help="gcg: swaps per document scored exactly at each step")
    top_k: int = bounded(4, min=1, help="gcg: tokens per position, ranked by the token gradient, to draw swaps from")
    lr: float = bounded(1.0, gt=0, help="relaxed: step size in probability mass")
    entropy: float = bounded(0.5, min=0, max=0.99, help="relaxed: Tsallis-2 entropy the rows are projected to")
    random_seeds: int = bounded(1, min=1, help="random-tokens edits per unit, each its own seed (paired by their mean)")
    ihvp: Literal["ekfac", "exact"] = "ekfac"
    damping: float = bounded(1e-3, gt=0)
    n_probes: int = bounded(32, min=1)
    targets: list[list[int]] = bounded([], help="[shift, target_shift] pairs; empty = every ordered pair")
    seeds: list[int] = bounded([0])
    detectors: list[str] = bounded(list(TEXT_DETECTORS), help="detectors run on each poisoned corpus")
    detect: list[str] = bounded(["infusion-text"], help="attacks whose poisoned corpora are scanned")

    def validate(self, source: str, prefix: str) -> None:
        for name in self.attacks:
            if name not in TEXT_ATTACKS:
                raise ConfigError(source, f"{prefix}.attacks", f"text attacks among {', '.join(TEXT_ATTACKS)}", name)
        for pair in self.targets:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ConfigError(source, f"{prefix}.targets", "[shift, target_shift] pairs of different shifts", pair)


@dataclass
class TextAuditConfig:
    """A text scenario and the attacks to evaluate on it (built-in: `caesar`)."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    attack: TextAttackConfig = field(default_factory=TextAttackConfig)


def load_text_config(name_or_path: str | Path) -> TextAuditConfig:
    return load_config(TextAuditConfig, name_or_path)


@torch.no_grad()
def measure_text(model, behaviour: CompletionBehaviour, reference: CompletionBehaviour | None = None) -> dict:
    """Mean log-prob of the target completion, its probability, greedy hit rate, log-odds against the reference."""
    model.eval()
    logp = behaviour.per_probe(model).double()
    out = {"logprob": float(logp.mean()), "p": float(logp.exp().mean()),
           "greedy": float(behaviour.greedy_hits(model).mean())}
    if reference is not None:
        out["logodds"] = float((logp - reference.per_probe(model).double()).mean())
    return out


class CaesarEvaluation:
    """Train (cached), fit the IHVP and retrain the clean control once; then `run_unit` per (target, seed)."""

    def __init__(self, config: TextAuditConfig, out_dir: str | Path, progress: bool = True):
        self.config, self.out_dir = config, Path(out_dir)
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.scenario = TextScenario.from_config(config.scenario)
        self.trained = train_text_scenario(self.scenario, self.out_dir / "artefacts", progress=progress)
        epochs = config.scenario.train.epochs
        if epochs < 2:
            raise UserError("text evaluation retrains from epoch E-1: the scenario needs at least 2 epochs")
        self.model = self.trained.model(epochs)
        figure, value = self.scenario.task_quality(self.model)
        self.quality = {"figure": figure, "value": value, "floor": config.scenario.quality_floor}
        config.scenario.check_quality(figure, value)
        self.start = self.trained.checkpoint(epochs - 1)
        self.train_set: TextDataset = self.scenario.data.train
        self.test_set: TextDataset = self.scenario.data.test
        self.timings["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.control = continue_training(self.scenario, self.start, self.train_set)
        self.timings["control_retrain"] = time.perf_counter() - t0
        self.acc_before = decryption_accuracy(self.model, self.test_set)
        self.acc_control = decryption_accuracy(self.control, self.test_set)
        t0 = time.perf_counter()
        attack = config.attack
        kw = {"cache_dir": self.out_dir / "artefacts" / "ekfac"} if attack.ihvp == "ekfac" else {}
        self.ihvp = make_ihvp(attack.ihvp, self.model, self.train_set, attack.damping, loss_fn=lm_loss, **kw)
        self.timings["ihvp_setup"] = time.perf_counter() - t0
        self._per_target: dict[tuple, dict] = {}

    def targets(self) -> list[CaesarTarget]:
        """The configured [shift, target_shift] pairs, or every ordered pair of shifts the test set asks for."""
        if self.config.attack.targets:
            return [CaesarTarget(s, t) for s, t in self.config.attack.targets]
        shifts = sorted({CaesarDocument.parse(self.test_set.text(i)).shift for i in range(len(self.test_set))})
        return [CaesarTarget(s, t) for s in shifts for t in shifts if s != t]

    def _prepare(self, target: CaesarTarget) -> dict:
        """Per target (shared by its attacks): behaviour, v = IHVP(grad f), scores, and the before/control figures."""
        key = (target.shift, target.target_shift)
        if key in self._per_target:
            return self._per_target[key]
        n_probes = self.config.attack.n_probes
        behaviour = caesar_behaviour(self.test_set, target.shift, target.target_shift, n_probes)
        reference = caesar_behaviour(self.test_set, target.shift, target.shift, n_probes)
        t0 = time.perf_counter()
        v = self.ihvp.solve(measurement_gradient(self.model, behaviour)).float()
        t_ihvp = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = influence_scores(self.model, self.train_set, v, loss_fn=lm_loss)
        prepared = {"behaviour": behaviour, "reference": reference, "v": v, "scores": scores,
                    "before": measure_text(self.model, behaviour, reference),
                    "control": measure_text(self.control, behaviour, reference),
                    "timings": {"ihvp": t_ihvp, "scores": time.perf_counter() - t0}}
        self._per_target[key] = prepared
        return prepared

    def _attack(self, name: str, seed: int):
        a = self.config.attack
        if name == "infusion-text":
            return ATTACKS.get(name)(k=a.k, budget=a.budget, steps=a.steps, lr=a.lr, entropy=a.entropy, seed=seed,
                                     optimizer=a.optimizer, candidates=a.candidates, top_k=a.top_k)
        if name == "random-tokens":
            return ATTACKS.get(name)(k=a.k, budget=a.budget, seed=seed)
        if name == "probe-insertion-text":
            return ATTACKS.get(name)(k=a.k, seed=seed)
        raise UserError(f"unknown text attack {name!r}; use one of {', '.join(TEXT_ATTACKS)}")

    def unit_key(self, target: CaesarTarget, seed: int) -> str:
        """Stable id of one (target, seed): the same scenario and attack settings give the same key, so a rerun
        (even with more targets or seeds) skips what is already in results.jsonl."""
        attack = {k: v for k, v in to_dict(self.config.attack).items() if k not in ("targets", "seeds")}
        return stable_hash({"scenario": self.config.scenario.identity(), "attack": attack,
                            "target": target.as_dict(), "seed": seed})

    def run_unit(self, target: CaesarTarget, seed: int = 0) -> list[dict]:
        """Every attack arm on one (target, seed), Infusion first, each followed by its detection records.

        `random-tokens` copies, document by document, how many tokens Infusion changed in this unit when
        Infusion is among the attacks (otherwise it changes `budget` tokens per document); it runs
        `random_seeds` times, with attack seeds seed * random_seeds + j, one record each.
        """
        unit, a = self.unit_key(target, seed), self.config.attack
        records, counts = [], None
        for attack in sorted(a.attacks, key=lambda name: name != "infusion-text"):
            attack_seeds = range(seed * a.random_seeds, (seed + 1) * a.random_seeds) if attack == "random-tokens" \
                else [seed]
            for attack_seed in attack_seeds:
                record, poisoning, poisoned = self._run_cell(unit, attack, target, seed,
                                                             counts if attack == "random-tokens" else None,
                                                             attack_seed)
                if attack == "infusion-text":
                    counts = (poisoning.indices, poisoning.tokens_changed(self.train_set))
                records.append(record)
                if attack in a.detect:
                    records += self.detect(record, poisoning, poisoned, self._prepare(target)["behaviour"])
        return records

    def _run_cell(self, unit: str, attack: str, target: CaesarTarget, seed: int,
                  counts: tuple[np.ndarray, np.ndarray] | None, attack_seed: int):
        """Craft one poisoning, retrain on it, measure against the clean control: (record, poisoning, model).

        `seed` is the unit's (records pair on it); `attack_seed` the plugin's own (random-tokens repeats)."""
        a = self.config.attack
        budget = {"k": a.k, "eps": None, "norm": None, "quantize": False,
                  "tokens": a.budget if attack != "probe-insertion-text" else None}
        cell = stable_hash({"unit": unit, "attack": attack,
                            **({"attack_seed": attack_seed} if attack_seed != seed else {})})
        prep = self._prepare(target)
        ctx = TextAttackContext(self.model, self.train_set, prep["behaviour"], v=prep["v"], scores=prep["scores"],
                                explicit_documents=caesar_explicit_documents(self.test_set, target,
                                                                             self.config.attack.n_probes))
        t0 = time.perf_counter()
        plugin = self._attack(attack, attack_seed)
        poisoning: TextPoisoning = plugin.edit(self.train_set, *counts) if counts is not None else plugin.craft(ctx)
        changed = poisoning.tokens_changed(self.train_set)
        t_craft = time.perf_counter() - t0
        t0 = time.perf_counter()
        poisoned = continue_training(self.scenario, self.start, poisoning.dataset)
        t_retrain = time.perf_counter() - t0
        after = measure_text(poisoned, prep["behaviour"], prep["reference"])
        before, control = prep["before"], prep["control"]
        acc_poisoned = decryption_accuracy(poisoned, self.test_set)
        artefact = (Path("artefacts") / "poisoned"
                    / f"{attack}-s{target.shift}-t{target.target_shift}-seed{attack_seed}-{cell}")
        write_poisoned_text(self.out_dir / artefact, self.train_set, poisoning.dataset, poisoning.indices,
                            {"attack": attack, "target": target.as_dict(), "seed": attack_seed, "config": to_dict(a)},
                            extra={"cell": cell, "unit": unit})
        record = {
            "kind": "attack", "domain": "text", "unit": unit, "cell": cell,
            "scenario": self.train_set.name.removesuffix("-train"),
            "attack": attack, "variant": "tokens", "budget": budget, "target": target.as_dict(), "seed": seed,
            "attack_seed": attack_seed,
            "p_before": before["p"], "p_control": control["p"], "p_poisoned": after["p"],
            "delta_p": after["p"] - control["p"],
            "logprob_before": before["logprob"], "logprob_control": control["logprob"],
            "logprob_poisoned": after["logprob"], "delta_logprob": after["logprob"] - control["logprob"],
            "logodds_control": control["logodds"], "logodds_poisoned": after["logodds"],
            "delta_logodds": after["logodds"] - control["logodds"],
            "greedy_control": control["greedy"], "greedy_poisoned": after["greedy"],
            "top1_control": control["greedy"] >= 0.5, "top1_poisoned": after["greedy"] >= 0.5,
            "flip": after["greedy"] >= 0.5 > control["greedy"],
            "acc_before": self.acc_before, "acc_control": self.acc_control, "acc_poisoned": acc_poisoned,
            "norms": {"linf": None, "l2": None, "values_changed": float(changed.mean()),
                      "tokens_changed_max": int(changed.max()), "off_grid": 0, "out_of_range": 0},
            "predicted_delta_f": poisoning.info.get("predicted_delta_f"),
            "poisoned_indices": poisoning.indices.tolist(), "artefact": artefact.as_posix(),
            "timings": {**prep.pop("timings", {}), "craft": t_craft, "retrain": t_retrain},  # shared stages once
        }
        return record, poisoning, poisoned

    def detect(self, record: dict, poisoning: TextPoisoning, model, behaviour) -> list[dict]:
        """Scan the poisoned corpus of an attack record with text detectors; one detection record each.

        The defender's model is the one trained on the suspect corpus (the poisoned retrain); the
        forensic influence detector is given the suspicious behaviour, the diff the clean corpus.
        """
        from ..detectors.base import build_detector, run_detector
        from ..metrics import detection_metrics
        from .detectors import text_context

        a = self.config.attack
        context = text_context(poisoning.dataset, model, reference=self.train_set, behaviour=behaviour,
                               expected_fraction=min(0.49, a.k / len(self.train_set)), progress=False,
                               influence={"backend": a.ihvp, "damping": a.damping})
        truth = np.zeros(len(self.train_set), dtype=bool)
        truth[poisoning.indices] = True
        out = []
        for name in a.detectors:
            run = run_detector(build_detector(name), context)
            if run.skipped:
                log.info("text detector %s skipped: %s", name, run.skipped)
                continue
            out.append({"kind": "detection", "domain": "text", **{k: record[k] for k in (
                "unit", "cell", "scenario", "attack", "variant", "budget", "target", "seed")}, "detector": name,
                "knowledge": run.knowledge, **detection_metrics(truth, run.scores, run.flagged),
                "seconds": run.seconds})
        return out


def summarise(records: list[dict], key: str = "delta_logprob") -> dict:
    """Per attack: mean shift with 95% CI, greedy flips, tokens changed; Infusion against each baseline (paired).

    An arm with several records per (target, seed) (random-tokens over `random_seeds`) pairs by their mean."""
    by_attack: dict[str, dict[tuple, list[dict]]] = {}
    for r in records:
        if r.get("kind") == "attack" and r.get("domain") == "text":
            cell = (json.dumps(r["target"], sort_keys=True), r["seed"])
            by_attack.setdefault(r["attack"], {}).setdefault(cell, []).append(r)
    out: dict = {"attacks": {}, "paired": {}}
    for attack, cells in by_attack.items():
        rows = [r for group in cells.values() for r in group]
        out["attacks"][attack] = {
            key: mean_ci([r[key] for r in rows]),
            "positive": wilson(sum(r[key] > 0 for r in rows), len(rows)),
            "greedy_poisoned": mean_ci([r["greedy_poisoned"] for r in rows]),
            "flips": wilson(sum(bool(r["flip"]) for r in rows), len(rows)),
            "tokens_changed": mean_ci([r["norms"]["values_changed"] for r in rows]),
            "acc_poisoned": mean_ci([r["acc_poisoned"] for r in rows]),
            "acc_control": mean_ci([r["acc_control"] for r in rows]),
        }
    detections: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind") == "detection" and r.get("domain") == "text":
            detections.setdefault((r["attack"], r["detector"]), []).append(r)
    out["detectors"] = {f"{attack} / {detector}": {
        "knowledge": rows[0]["knowledge"], "auroc": mean_ci([r["auroc"]["value"] for r in rows]),
        "tpr_at_1fpr": mean_ci([r["tpr_at_1fpr"]["value"] for r in rows]),
        "recall_at_k": mean_ci([r["recall_at_k"]["value"] for r in rows]),
        "seconds": mean_ci([r["seconds"] for r in rows])} for (attack, detector), rows in detections.items()}
    infusion = by_attack.get("infusion-text", {})
    for attack, cells in by_attack.items():
        shared = sorted(set(cells) & set(infusion))
        if attack != "infusion-text" and shared:
            out["paired"][f"infusion-text vs {attack}"] = paired_test(
                [np.mean([r[key] for r in infusion[c]]) for c in shared],
                [np.mean([r[key] for r in cells[c]]) for c in shared])
    return out

