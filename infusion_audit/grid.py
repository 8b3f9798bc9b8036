"""The grid of an audit, run cell by cell: the one runner behind `attack` and `bench`.

A cell is one (attack arm, budget, target, seed, repeat). It crafts one poisoning on the attacker's model,
measures it on every victim (the same pipeline, or others for transfer) against a clean control, retrains
it under each mitigation, and, when the grid detects (`bench`; `attack` does not), runs the detectors on
the poisoned set with the unedited null, removes what each flags, retrains and measures what is left of
the attack and what the removal cost. Cells run in units (a cell with the arms that copy its documents);
all records of a cell are appended to results.jsonl in one write, by the driver only, so an interrupted
run loses at most the units in flight and re-running the same command skips finished cells. A plugin that
raises (an attack, a pipeline's training, a detector) costs only what it was computing: the cell records an
error and the others go on; a full disk stops the run (see `io.disk_full`).
"""

from __future__ import annotations

import logging
import platform
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .backdoor import is_backdoor
from .config import AttackSpec, AuditConfig, PipelineConfig, PluginSpec, to_dict
from .detection import Detection, UneditedNull, detect, detector_specs
from .errors import first_line
from .executors import Executor, LocalExecutor, SerialExecutor
from .io import append_jsonl_many, disk_full, read_jsonl, stable_hash, write_json
from .mitigations import build_mitigation
from .pipeline import Pipeline
from .protocol import Attacker, Crafted, Victim
from .registry import PIPELINES, load_callable
from .results import AttackRecord, DefenceRecord, DetectionRecord, ErrorRecord, MitigationRecord, Record, SkipRecord
from .runtime import configure, runtime_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One (attack arm, budget, target, seed, repeat) of the grid, and its key in results.jsonl."""

    spec_index: int
    budget_index: int
    target: object
    seed: int
    key: str
    repeat: int = 0


class Grid:
    """What every cell shares: the attacker (trained checkpoints, IHVP, per-target caches), one Victim per
    victim pipeline (its own trained checkpoints and clean control), one per mitigation, and the unedited null
    of each detection figure. `detect`: whether cells run detection and defence (bench) or not (attack)."""

    def __init__(self, config: AuditConfig, run_dir: str | Path, progress: bool = True, detect: bool = True):
        self.config, self.run_dir, self.detects = config, Path(run_dir), detect
        self.attacker = Attacker(config, self.run_dir, progress=progress)
        self.victims = {self.victim_name(None): self.attacker.victim}
        for spec in config.victims:
            name = self.victim_name(spec)
            if name not in self.victims:
                self.victims[name] = Victim.train(victim_pipeline(config.pipeline, spec), config.attack.protocol,
                                                  self.run_dir / "artefacts", progress=progress)
        main = self.attacker.victim
        self.mitigated = {label: Victim(main.pipeline, main.trained, config.attack.protocol,
                                        build_mitigation(spec.name, spec.params))
                          for label, spec in plugin_labels(config.mitigations).items()}
        self._null: UneditedNull | None = None

    def victim_name(self, spec: PluginSpec | None) -> str:
        """A victim's label: its model's or pipeline's name (the main victim: the pipeline's factory, if it
        names one, else its model), with a short hash of its params."""
        spec = spec or self.config.pipeline.factory or self.config.pipeline.model
        return spec.name + (f"({stable_hash(spec.params, 6)})" if spec.params else "")

    def units(self) -> list[list[Cell]]:
        """The grid's cells grouped into units that run in one process: an arm that copies another's documents
        (`like`) runs after it, in its unit; every other cell is a unit of its own."""
        units, seen = [], set()
        attack, attacker = self.config.attack, self.attacker
        order = sorted(range(len(attack.attacks)), key=lambda s: attacker.source_spec(attack.attacks[s]) is not None)
        for b, budget in enumerate(self.config.grid_budgets()):
            for target in attacker.targets():
                for seed in attack.seeds:
                    by_spec: dict[int, list[Cell]] = {}
                    for s in order:
                        spec = attack.attacks[s]
                        for repeat in range(spec.repeats):
                            key = attacker.cell_key(spec, target, seed, budget, repeat)
                            if key in seen:  # an attack that ignores eps is the same cell under two budgets
                                continue
                            seen.add(key)
                            cell = Cell(s, b, target, seed, key, repeat)
                            source = attacker.source_spec(spec)
                            home = attack.attacks.index(source) if source is not None else s
                            if home in by_spec:
                                by_spec[home].append(cell)
                            else:
                                by_spec[s] = [cell]
                                units.append(by_spec[s])
        return units

    def run_unit(self, unit: list[Cell]) -> list[list[Record]]:
        """The records of each cell of a unit (one list per cell, in order). A cell whose source arm's cell
        is not in the unit (recorded by an earlier run) crafts that poisoning again: it is deterministic."""
        return [self.run_cell(cell) for cell in unit]

    def run_cell(self, cell: Cell) -> list[Record]:
        """Every record of one cell: the attack on each victim and under each mitigation, then (when the grid
        detects) detection and defence on the main victim. What raises records an error instead: crafting or
        measuring (no other record: the next run tries the cell again), detection as a whole, or one detector."""
        spec: AttackSpec = self.config.attack.attacks[cell.spec_index]
        budget = self.config.grid_budgets()[cell.budget_index]
        try:
            crafted = self.attacker.craft(spec, cell.target, cell.seed, budget, cell.repeat)
            records, main = [], None
            for name, victim in self.victims.items():
                # a transfer victim is its own arm in tables and charts
                variant = crafted.variant if main is None else f"{crafted.variant} → {name}".lstrip(" →")
                record, retrained = self.attacker.measure(crafted, victim, victim=name, variant=variant)
                if main is None:
                    main = (record, retrained.model, victim)
                records.append(record)
            records += self.mitigate(crafted, records[0])
        except Exception as exc:
            if disk_full(exc):
                raise
            params = self.attacker.build_attack(spec, cell.seed, budget, cell.repeat).get_params()
            return [error_record(exc, "attack", cell=cell.key, dataset=self.config.pipeline.dataset.name,
                                 attack=spec.name, variant=spec.variant, target=cell.target.as_dict(), seed=cell.seed,
                                 budget={key: params[key] for key in to_dict(budget) if key in params})]
        scanned = self.config.scan.attacks
        if not self.detects or cell.repeat or scanned and spec.name not in scanned:
            return records
        try:
            return records + self.detect_and_defend(crafted, *main)
        except Exception as exc:
            if disk_full(exc):
                raise
            return records + [error_record(exc, "detection", **records[0].shared_fields())]

    def mitigate(self, crafted: Crafted, plain: AttackRecord) -> list[MitigationRecord]:
        """The cell retrained under each mitigation against a clean control trained under the same one."""
        return [self.attacker.measure(crafted, victim, MitigationRecord, victim=plain.victim, mitigation=label,
                                      mitigation_params=victim.mitigation.get_params(),
                                      acc_unmitigated=plain.acc_control,
                                      timings={"control": victim.control()["seconds"],
                                               "retrain_unmitigated": plain.timings["retrain"]})[0]
                for label, victim in self.mitigated.items()]

    def detect_and_defend(self, crafted: Crafted, main: AttackRecord, poisoned_model, victim: Victim) -> list[Record]:
        """The cell's detection records (each with its unedited null), and for each detector the defence:
        remove what it flags, retrain, and measure what is left against the clean control with the same
        documents removed."""
        from .detectors import audit_context
        from .detectors.base import SKIP_LOG

        clean, options = self.attacker.pipeline.data.train, self.config.scan
        poisoned_set = crafted.poisoned_set
        behaviour = self.attacker.context.behaviour(crafted.target)
        t0 = time.perf_counter()
        with _silenced(SKIP_LOG):  # skip reasons go in the records; the driver says each once per run
            context = audit_context(poisoned_set, poisoned_model, reference=clean, behaviour=behaviour,
                                    expected_fraction=options.expected_fraction, progress=False,
                                    features_layer=options.features_layer, influence=self.config.influence)
            result = detect(context, detector_specs(options.detectors, poisoned_set), truth=crafted.poisoning.indices,
                            bootstrap=options.bootstrap)
            null = self.unedited(crafted, result)
        scan_seconds = time.perf_counter() - t0
        common = main.shared_fields()
        out: list[Record] = []
        control = victim.control()
        truth = result.truth
        for label, run in result.completed:
            out.append(DetectionRecord(**common, **{**result.figures[label], "detector": label},
                                       context_seconds=scan_seconds, details=run.details or None,
                                       **null.get(label, {})))
            defence = self.config.defence
            if not defence.enabled or defence.detectors and label not in defence.detectors:
                continue
            flagged = np.flatnonzero(run.flagged)
            t1 = time.perf_counter()
            if len(flagged):
                defended = victim.retrain(poisoned_set.without(flagged)).model
                # the same documents removed from the clean set: what is left is the attack's, not the removal's
                removed_control = victim.retrain(clean.without(flagged)).model
            else:  # nothing removed: training is deterministic, so the retrains would be these two again
                defended, removed_control = poisoned_model, control["model"]
            after, baseline = behaviour.figures(defended), behaviour.figures(removed_control)
            backdoor = {"asr_after": after["asr"], "asr_control_removed": baseline["asr"],
                        "delta_asr_after": after["asr"] - baseline["asr"],
                        "delta_asr_before": main.delta_asr} if "asr" in after else {}
            out.append(DefenceRecord(**common, **backdoor, detector=label, knowledge=run.knowledge,
                                     removed=int(run.flagged.sum()), removed_poisons=int((run.flagged & truth).sum()),
                                     p_after=after["p"], p_control_removed=baseline["p"],
                                     delta_p_after=after["p"] - baseline["p"], delta_p_before=main.delta_p,
                                     delta_logodds_after=after["logodds"] - baseline["logodds"],
                                     delta_logodds_before=main.delta_logodds,
                                     flip_after=after["top1"] and not baseline["top1"],
                                     acc_after=victim.quality(defended), acc_control=control["accuracy"],
                                     acc_control_removed=victim.quality(removed_control),
                                     seconds=time.perf_counter() - t1))
        failed = result.failed
        out += [SkipRecord(**common, detector=label, reason=reason) for label, reason in result.skipped.items()
                if label not in failed]
        out += [ErrorRecord(**common, stage="detector", detector=label, error=error.split(": ", 1)[0],
                            message=error.split(": ", 1)[-1]) for label, error in failed.items()]
        return out

    def unedited(self, crafted: Crafted, scanned: Detection) -> dict[str, dict]:
        """The unedited null of the cell's detection figures (see `detection.UneditedNull`), for attacks that
        edit documents in place within a perturbation bound and keep their labels, and for backdoors (a stamped,
        perhaps relabelled, document's counterpart is the clean document with its own label): a document
        relabelled or replaced to push one test input has no unedited counterpart."""
        clean, poisoning = self.attacker.pipeline.data.train, crafted.poisoning
        params = crafted.attack.get_params()
        bounded = params.get("eps") is not None or params.get("tokens") is not None  # probe insertion: unbounded
        if not is_backdoor(crafted.target) and (not bounded or not poisoning.edits_in_place(clean)):
            return {}
        if self._null is None:
            self._null = UneditedNull(clean, self.attacker.victim.control()["model"], self.config.scan,
                                      self.config.influence)
        return self._null.figures(scanned, poisoning.indices, self.attacker.context.behaviour(crafted.target),
                                  crafted.target)


def error_record(exc: Exception, stage: str, **where) -> ErrorRecord:
    """The record of what raised in a cell: its type, its first line, and the innermost frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    return ErrorRecord(**where, stage=stage, error=type(exc).__name__, message=first_line(exc),
                       where=f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else None)


def victim_pipeline(pipeline: PipelineConfig, spec: PluginSpec) -> PipelineConfig:
    """The pipeline a transfer victim trains by: the same data and recipe with its own pipeline factory, or the
    built-in recipe with its own model."""
    found = load_callable(spec.name) if ":" in spec.name else None
    if spec.name in PIPELINES.names() or isinstance(found, type) and issubclass(found, Pipeline):
        return replace(pipeline, factory=spec)
    return replace(pipeline, model=spec, factory=None)


def plugin_labels(specs: list[PluginSpec]) -> dict[str, PluginSpec]:
    """A label per plugin spec: its name, with a short hash of its params when the name occurs twice."""
    names = [spec.name for spec in specs]
    return {(spec.name if names.count(spec.name) == 1 else f"{spec.name}({stable_hash(spec.params, 6)})"): spec
            for spec in specs}


@contextmanager
def _silenced(logger: logging.Logger):
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


# --------------------------------------------------------------------------- running it
def _worker_grid(config: AuditConfig, run_dir: str, detect: bool) -> Grid:
    """A worker's state (built once per worker by the executor): the shared checkpoints, IHVP and controls."""
    logging.getLogger().setLevel(logging.WARNING)
    configure(None, config.pipeline.train.device)  # the executor set the threads
    return Grid(config, run_dir, progress=False, detect=detect)


def run_grid(config: AuditConfig, out: Path, executor: Executor, progress: bool = True, detect: bool = True) -> None:
    """Run the units of the grid not yet recorded in out/results.jsonl on `executor` (in this process for a
    serial one, with the driver's own grid); only this process writes records; write out/provenance.json."""
    started = time.perf_counter()
    results = out / "results.jsonl"
    grid = Grid(config, out, progress=progress, detect=detect)
    for line in grid.attacker.shown_targets():
        log.warning("%s", line)
    units = grid.units()
    n_cells = sum(len(unit) for unit in units)
    done = {r["cell"] for r in read_jsonl(results) if r.get("kind") == "attack"}
    todo = [pending for pending in ([c for c in unit if c.key not in done] for unit in units) if pending]
    left = sum(len(unit) for unit in todo)
    log.info("%d cells, %d already finished, %d to run", n_cells, n_cells - left, left)
    bar = tqdm(total=n_cells, initial=n_cells - left, desc="cells", unit="cell", disable=not progress)
    said: set = set()  # (detector, reason) already logged
    factors: list[float] = [grid.attacker.context.timings["factors"]] if "factors" in grid.attacker.context.timings \
        else []  # the IHVP's fit, wherever it happened (a worker's records carry its own)

    def finish(cells: list[list[Record]]) -> None:
        for records in cells:
            append_jsonl_many(results, [r.to_dict() for r in records])
            factors.extend(r.timings["factors_shared"] for r in records if r.kind == "attack")
            for r in records:  # each distinct reason a detector did not run, once per run; every error
                if r.kind == "skip" and (r.detector, r.reason) not in said:
                    said.add((r.detector, r.reason))
                    log.warning("%s not run: %s", r.detector, r.reason)
                if r.kind == "error":
                    log.warning("%s, target %s: %s raised %s: %s (recorded; the other cells go on)", r.attack,
                                r.target, r.detector or r.stage, r.error, r.message)
            bar.update(1)

    if isinstance(executor, SerialExecutor) or isinstance(executor, LocalExecutor) and len(todo) <= 1:
        for unit in todo:
            finish(grid.run_unit(unit))
    else:
        for _, cells in executor.map_unordered(_worker_grid, (config, str(out), detect), Grid.run_unit, todo):
            finish(cells)
    bar.close()
    write_json(out / "provenance.json", provenance(config, grid, time.perf_counter() - started, left,
                                                  max(factors) if factors else None))


def package_versions() -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("infusion-audit", "torch", "torchvision", "numpy", "scikit-learn", "scipy", "kronfluence",
                 "transformers", "jinja2", "matplotlib"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), **versions}


def provenance(config: AuditConfig, grid: Grid, seconds: float, cells_run: int, factors: float | None) -> dict:
    """What a reviewer needs to trust or repeat the run: versions, compute, seeds, data hashes, timings
    (`factors`: the IHVP's fit, the longest any process of this invocation spent on it; None if none did)."""
    data = grid.attacker.pipeline.data
    return {
        "domain": grid.attacker.pipeline.kind,
        "packages": package_versions(), "compute": runtime_info(config.pipeline.train.device),
        "config_hash": stable_hash(to_dict(config)),
        "seeds": {"train": config.pipeline.train.seed, "targets": config.attack.targets.seed,
                  "attack": config.attack.seeds},
        "data": {"train_hash": data.train.content_hash(), "test_hash": data.test.content_hash(),
                 "n_train": len(data.train), "n_test": len(data.test)},
        "class_names": getattr(data.train, "class_names", None),
        "training": {name: {k: v for k, v in victim.trained.metrics.items() if k != "history"}
                     for name, victim in grid.victims.items()},
        "task_quality": grid.attacker.quality,
        "seconds_this_invocation": round(seconds, 2), "cells_run_this_invocation": cells_run,
        "shared_stage_seconds": {"influence_factors": factors},
    }
