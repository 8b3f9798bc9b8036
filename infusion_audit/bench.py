"""`infusion-audit bench`: the attack-then-defend benchmark, the tool's main job.

A grid of attacks x budgets x targets x seeds on one pipeline (images, text or a user's own: the
same code). Each cell crafts one poisoning on the attacker's model, measures it on every victim (the
same architecture, or others for transfer) against a clean control, runs the detectors on the poisoned
set, and for each detector removes what it flags, retrains and measures what is left of the attack and
what the removal cost. Cells run in units (a cell with the arms that copy its documents); all records
of a cell are appended to results.jsonl in one write, so an interrupted run loses at most the unit in
flight and re-running the same command skips finished cells.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import PluginSpec, ScenarioConfig, dump_yaml, from_sections, load_yaml, resolve_config_path, to_dict
from .errors import ConfigError, UserError
from .evaluation import (AttackConfig, AttackEvaluation, AttackRunConfig, AttackSpec, BudgetConfig, Victim,
                         resolve_attacks)
from .scan import ScanConfig
from .executors import DEFAULT_WORKERS, EXECUTORS, Executor, LocalExecutor, SerialExecutor, make_executor
from .io import append_jsonl_many, atomic_write_text, read_jsonl, repair_jsonl, run_lock, stable_hash, write_json
from .mitigations import build_mitigation
from .pipeline import Pipeline
from .registry import PIPELINES, load_callable
from .runtime import runtime_info

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "bench-digits"
UNEDITED_METRICS = ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "recall_at_k")  # the null of each figure


@dataclass
class DefenceConfig:
    """Remove what each detector flags and retrain by the attack protocol on what is left."""

    enabled: bool = True
    detectors: list[str] = field(default_factory=list, metadata={
        "help": "the detectors (their labels) whose flags are removed (default: every detector scanned)"})


@dataclass
class BenchConfig:
    """A scenario, the attack grid and its budgets, the victims, the detectors (`scan`) and the defence."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    budgets: list[BudgetConfig] = field(default_factory=list)  # empty: attack.budget alone
    victims: list[PluginSpec] = field(default_factory=list, metadata={
        "help": "more victims trained on the poisoned set (transfer): a model (trained by the built-in recipe) or "
                "a pipeline (a registered one or a Pipeline subclass as package.module:Class)"})
    scan: ScanConfig = field(default_factory=ScanConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    mitigations: list[PluginSpec] = field(default_factory=list, metadata={
        "help": "ways of training the victim (clip, dp-sgd, partition): each cell is retrained and measured "
                "under each, against a clean control trained under the same mitigation"})

    def grid_budgets(self) -> list[BudgetConfig]:
        return self.budgets or [self.attack.budget]

    def validate(self, source: str, prefix: str) -> None:
        from .registry import DETECTORS, MITIGATIONS, MODELS, PIPELINES

        resolve_attacks(self.scenario, self.attack, source)

        for i, spec in enumerate(self.scan.detectors):
            if ":" not in spec.name and spec.name not in DETECTORS.names():
                raise ConfigError(source, f"scan.detectors[{i}].name",
                                  f"a known detector ({', '.join(DETECTORS.names())})", spec.name)
        for i, spec in enumerate(self.mitigations):
            if ":" not in spec.name and spec.name not in MITIGATIONS.names():
                raise ConfigError(source, f"mitigations[{i}].name",
                                  f"a known mitigation ({', '.join(MITIGATIONS.names())})", spec.name)
        for i, spec in enumerate(self.victims):
            if ":" not in spec.name and spec.name not in MODELS.names() + PIPELINES.names():
                raise ConfigError(source, f"victims[{i}].name", "a known model or pipeline "
                                  f"({', '.join(MODELS.names() + PIPELINES.names())})", spec.name)


@dataclass(frozen=True)
class Cell:
    """One (attack arm, budget, target, seed, repeat) of the grid."""

    spec_index: int
    budget_index: int
    target: object
    seed: int
    key: str
    repeat: int = 0


# --------------------------------------------------------------------------- the runner
class BenchRunner:
    """What every cell shares: the attacker's evaluation (trained checkpoints, IHVP, per-target caches)
    and one Victim per victim model (its own trained checkpoints and clean control)."""

    def __init__(self, config: BenchConfig, run_dir: str | Path, progress: bool = True):
        self.config, self.run_dir = config, Path(run_dir)
        self.evaluation = AttackEvaluation(AttackRunConfig(config.scenario, config.attack), self.run_dir,
                                           progress=progress)
        self.victims = {self.victim_name(None): self.evaluation.victim}
        self._null_runs: dict = {}  # (detector label, target or None) -> its run on the unedited clean set
        for spec in config.victims:
            name = self.victim_name(spec)
            if name not in self.victims:
                self.victims[name] = Victim.train(victim_scenario(config.scenario, spec), config.attack.protocol,
                                                  self.run_dir / "artefacts", progress=progress)
        main = self.evaluation.victim
        self.mitigated = {label: Victim(main.scenario, main.trained, config.attack.protocol,
                                        build_mitigation(spec.name, spec.params))
                          for label, spec in plugin_labels(config.mitigations).items()}

    def victim_name(self, spec: PluginSpec | None) -> str:
        """A victim's label: its model's or pipeline's name (the main victim: the scenario's pipeline, if it
        names one, else its model), with a short hash of its params."""
        spec = spec or self.config.scenario.pipeline or self.config.scenario.model
        return spec.name + (f"({stable_hash(spec.params, 6)})" if spec.params else "")

    def units(self) -> list[list[Cell]]:
        """The grid's cells grouped into units that run in one process: an arm that copies another's documents
        (`like`) runs after it, in its unit; every other cell is a unit of its own."""
        units, seen = [], set()
        attack, evaluation = self.config.attack, self.evaluation
        order = sorted(range(len(attack.attacks)), key=lambda s: evaluation.source_spec(attack.attacks[s]) is not None)
        for b, budget in enumerate(self.config.grid_budgets()):
            for target in evaluation.targets():
                for seed in attack.seeds:
                    by_spec: dict[int, list[Cell]] = {}
                    for s in order:
                        spec = attack.attacks[s]
                        for repeat in range(spec.repeats):
                            key = evaluation.cell_id(spec, target, seed, budget, repeat)
                            if key in seen:  # an attack that ignores eps is the same cell under two budgets
                                continue
                            seen.add(key)
                            cell = Cell(s, b, target, seed, key, repeat)
                            source = evaluation.source_spec(spec)
                            home = attack.attacks.index(source) if source is not None else s
                            if home in by_spec:
                                by_spec[home].append(cell)
                            else:
                                by_spec[s] = [cell]
                                units.append(by_spec[s])
        return units

    def cells(self) -> list[Cell]:
        return [cell for unit in self.units() for cell in unit]

    def run_unit(self, unit: list[Cell]) -> list[list[dict]]:
        """The records of each cell of a unit (one list per cell, in order). A cell whose source arm's cell
        is not in the unit (recorded by an earlier run) crafts that poisoning again: it is deterministic."""
        return [self.run_cell(cell) for cell in unit]

    def run_cell(self, cell: Cell) -> list[dict]:
        """Every record of one cell: the attack on each victim, then detection and defence on the main victim."""
        spec: AttackSpec = self.config.attack.attacks[cell.spec_index]
        budget = self.config.grid_budgets()[cell.budget_index]
        crafted = self.evaluation.craft(spec, cell.target, cell.seed, budget, cell.repeat)
        records, main = [], None
        for name, victim in self.victims.items():
            record, poisoned_model = self.evaluation.record(crafted, victim)
            record["victim"] = name
            if main is None:
                main = (record, poisoned_model, victim)
            else:  # a transfer victim is its own arm in tables and charts
                record["variant"] = f"{record['variant']} → {name}".lstrip(" →")
            records.append(record)
        records += self.mitigate(crafted, records[0])
        scanned = self.config.scan.attacks
        if cell.repeat or scanned and spec.name not in scanned:
            return records
        return records + self.detect_and_defend(crafted, *main)

    def mitigate(self, crafted, plain: dict) -> list[dict]:
        """The cell retrained under each mitigation against a clean control trained under the same one."""
        out = []
        for label, victim in self.mitigated.items():
            record, _ = self.evaluation.record(crafted, victim)
            record.update(kind="mitigation", victim=plain["victim"], mitigation=label,
                          mitigation_params=victim.mitigation.get_params(), acc_unmitigated=plain["acc_control"])
            record["timings"].update(control=victim.control()["seconds"], retrain_unmitigated=plain["timings"]["retrain"])
            out.append(record)
        return out

    def detect_and_defend(self, crafted, record: dict, poisoned_model, victim: Victim) -> list[dict]:
        from .detectors.base import SKIP_LOG
        from .scan import scan

        clean = self.evaluation.scenario.data.train
        poisoned_set = crafted.poisoned_set
        behaviour = self.evaluation.context.behaviour(crafted.target)
        t0 = time.perf_counter()
        options = self.config.scan
        with _silenced(SKIP_LOG):  # skip reasons go in the records; the driver says each once per run
            result = scan(poisoned_set, detectors=options.detectors or None, model=poisoned_model, reference=clean,
                          behaviour=behaviour, truth=crafted.poisoning.indices,
                          expected_fraction=options.expected_fraction, influence=options.influence,
                          bootstrap=options.bootstrap, progress=False, features_layer=options.features_layer)
        scan_seconds = time.perf_counter() - t0
        common = {k: record[k] for k in ("cell", "scenario", "attack", "variant", "budget", "target", "seed",
                                         "victim")}
        out = []
        control = victim.control()
        truth = result.truth
        null = self.unedited_detection(crafted, result)
        for (label, run) in result.completed:
            out.append({"kind": "detection", **common, **result.detection[label], "detector": label,
                        "context_seconds": scan_seconds, **null.get(label, {})})
            defence = self.config.defence
            if not defence.enabled or defence.detectors and label not in defence.detectors:
                continue
            flagged = np.flatnonzero(run.flagged)
            t1 = time.perf_counter()
            defended = victim.retrain(poisoned_set.without(flagged))
            # the same documents removed from the clean set: what is left is the attack's, not the removal's
            removed_control = victim.retrain(clean.without(flagged))
            after, baseline = behaviour.figures(defended), behaviour.figures(removed_control)
            out.append({"kind": "defence", **common, "detector": label, "knowledge": run.knowledge,
                        "removed": int(run.flagged.sum()), "removed_poisons": int((run.flagged & truth).sum()),
                        "p_after": after["p"], "p_control_removed": baseline["p"],
                        "delta_p_after": after["p"] - baseline["p"], "delta_p_before": record["delta_p"],
                        "delta_logodds_after": after["logodds"] - baseline["logodds"],
                        "delta_logodds_before": record["delta_logodds"],
                        "flip_after": after["top1"] and not baseline["top1"],
                        "acc_after": victim.quality(defended), "acc_control": control["accuracy"],
                        "acc_control_removed": victim.quality(removed_control),
                        "seconds": time.perf_counter() - t1})
        out += [{"kind": "skip", **common, "detector": label, "reason": run.skipped}
                for label, run in zip(result.labels, result.runs) if run.skipped]
        return out

    def unedited_detection(self, crafted, scanned) -> dict[str, dict]:
        """The null of each detection figure: the same documents unedited, scored by the detectors of `scanned`
        (the cell's scan) with the clean control's model, as `<metric>_unedited` fields per detector label.
        What a detector finds here comes from the attack's choice of documents alone; the difference is what
        the edit adds. Only for attacks that edit documents in place within a perturbation bound and keep
        their labels: a relabelled or replaced document has no unedited counterpart."""
        from .detectors import build_detector, run_detector
        from .detectors.base import SKIP_LOG
        from .scan import evaluate_run, truth_mask

        clean, poisoning = self.evaluation.scenario.data.train, crafted.poisoning
        params = crafted.attack.get_params()
        bounded = params.get("eps") is not None or params.get("tokens") is not None  # probe insertion: unbounded
        if not bounded or not poisoning.edits_in_place(clean):
            return {}
        context = self.unedited_context  # the unedited documents are the clean set's own
        context.behaviour = self.evaluation.context.behaviour(crafted.target)
        truth = truth_mask(poisoning.indices, len(clean))
        out = {}
        with _silenced(SKIP_LOG):
            for label, run in scanned.completed:
                # only a forensic run reads the behaviour: any other scores the clean set the same in every cell
                key = (label, crafted.target if run.knowledge == "forensic" else None)
                if key not in self._null_runs:
                    self._null_runs[key] = run_detector(build_detector(run.name, run.params), context)
                null = self._null_runs[key]
                if null.skipped is None:
                    record = evaluate_run(null, truth, context.labels, bootstrap=0)
                    out[label] = {f"{m}_unedited": record[m] for m in UNEDITED_METRICS if m in record}
                    out[label]["unedited_model"] = "clean control"
        return out

    @cached_property
    def unedited_context(self):
        """The clean set as the defender's detectors see it through the main victim's clean control, shared by
        every cell (features, gradients and influence factors computed once; each cell sets its behaviour)."""
        from .detectors import audit_context

        clean, options = self.evaluation.scenario.data.train, self.config.scan
        return audit_context(clean, self.evaluation.victim.control()["model"], reference=clean,
                            expected_fraction=options.expected_fraction, progress=False,
                            features_layer=options.features_layer,
                            **({"influence": dict(options.influence)} if options.influence else {}))


def victim_scenario(scenario: ScenarioConfig, spec: PluginSpec) -> ScenarioConfig:
    """The scenario a transfer victim trains in: the same data and recipe with its own pipeline, or the
    built-in recipe with its own model."""
    found = load_callable(spec.name) if ":" in spec.name else None
    if spec.name in PIPELINES.names() or isinstance(found, type) and issubclass(found, Pipeline):
        return replace(scenario, pipeline=spec)
    return replace(scenario, model=spec, pipeline=None)


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


def _append_cell(results: Path, records: list[dict], said: set) -> None:
    """Append a cell's records; log each distinct reason a detector did not run once per run, not once per cell."""
    append_jsonl_many(results, records)
    for r in records:
        if r["kind"] == "skip" and (r["detector"], r["reason"]) not in said:
            said.add((r["detector"], r["reason"]))
            log.warning("%s not run: %s", r["detector"], r["reason"])


# --------------------------------------------------------------------------- workers
def _worker_runner(config: BenchConfig, run_dir: str) -> BenchRunner:
    """A worker's state (built once per worker by the executor): the shared checkpoints, IHVP and controls."""
    logging.getLogger().setLevel(logging.WARNING)
    return BenchRunner(config, run_dir, progress=False)


# --------------------------------------------------------------------------- the entry point
def load_bench_config(config=None) -> BenchConfig:
    """A BenchConfig from a YAML path, a built-in name (default: the quick digits benchmark) or a dict of
    sections, checked as a file is."""
    if isinstance(config, dict):
        data, source = config, "<dict>"
    else:
        data, source = load_yaml(resolve_config_path(config or DEFAULT_CONFIG))
    return from_sections(BenchConfig, data, source)


@dataclass(repr=False)
class BenchResult:
    """A benchmark's run directory, read back: its records by kind, the per-arm summaries, its report."""

    run_dir: Path
    report: Path | None = None  # report.html, when `bench` rendered it

    @cached_property
    def records(self) -> dict[str, list[dict]]:
        """results.jsonl by kind: 'attack', 'detection' and 'defence' records (one dict each)."""
        from .reports.render import load_records

        return load_records(self.run_dir)

    @cached_property
    def summaries(self) -> dict:
        """Per arm (attack, variant) and budget, with 95% CIs, as the report shows them: 'attacks' (effect),
        'detection' (one row per detector), 'defence' (what removing each detector's flags left), the
        'defence_measure' those rows compare ('delta_logodds') and 'mitigations' (each arm under each)."""
        from .reports.render import summarise_run

        return summarise_run(self.records)

    def write_report(self, path: str | Path | None = None) -> Path:
        """Render the HTML report (default: run_dir/report.html); returns its path."""
        from .reports import render_report

        return render_report(self.run_dir, path)

    def __repr__(self) -> str:
        counts = ", ".join(f"{kind}={len(rows)}" for kind, rows in self.records.items())
        return f"BenchResult(run_dir={str(self.run_dir)!r}, {counts}, report={self.report and str(self.report)!r})"


def bench(config=None, out: str | Path = "runs/bench", jobs: int | None = 1, progress: bool = True,
          report: bool = True, executor: str = "local", address: str | None = None,
          gpus_per_worker: float = 0.0, device: str | None = None) -> BenchResult:
    """Run (or resume) a benchmark into `out`: a BenchConfig, a dict of config sections, a YAML path or a
    built-in name (default: the quick digits benchmark). Units run in this process (`jobs=1`), in `jobs`
    local processes, or on Ray (`executor="ray"`, at `address`; `jobs` caps the workers, None: as many as
    the cluster holds). `device` ("auto", "cpu", "cuda"; default: the scenario's train.device) is resolved
    here, once, and every worker computes on it. Returns the run read back as a BenchResult."""
    if config is None or isinstance(config, (dict, str, Path)):
        config = load_bench_config(config)
    elif not hasattr(config, "scenario"):
        raise ConfigError("<config>", "", "a dict of sections, a YAML path, a built-in name or a BenchConfig",
                          type(config).__name__)
    config = replace(config, scenario=config.scenario.on_device(device))
    if executor == "ray" and config.scenario.train.device == "cuda" and not gpus_per_worker > 0:
        raise UserError("device cuda on the ray executor: give each worker a GPU with --gpus-per-worker (e.g. 1)")
    if gpus_per_worker > 0 and config.scenario.train.device == "cpu":
        log.warning("--gpus-per-worker %g, but the bench computes on the cpu (--device cuda or auto to use them)",
                    gpus_per_worker)
    out = Path(out)
    with run_lock(out):  # one writer per run directory: a second bench here is refused, not interleaved
        atomic_write_text(out / "config.yaml", dump_yaml(config))
        repair_jsonl(out / "results.jsonl")
        threads = runtime_info(config.scenario.train.device)["torch_threads"]
        run_grid(config, out, make_executor(executor, jobs, threads, address, gpus_per_worker), progress)
        result = BenchResult(out)
        if report:
            result.report = result.write_report()
    return result


def run_grid(config: BenchConfig, out: Path, executor: Executor, progress: bool = True) -> None:
    """Run the units of the grid not yet recorded in out/results.jsonl on `executor` (in this process for a
    serial one, with the driver's own runner); only this process writes records; write out/provenance.json."""
    started = time.perf_counter()
    results = out / "results.jsonl"
    runner = BenchRunner(config, out, progress=progress)
    units = runner.units()
    n_cells = sum(len(unit) for unit in units)
    done = {r["cell"] for r in read_jsonl(results) if r.get("kind") == "attack"}
    todo = [pending for pending in ([c for c in unit if c.key not in done] for unit in units) if pending]
    left = sum(len(unit) for unit in todo)
    log.info("%d cells, %d already finished, %d to run", n_cells, n_cells - left, left)
    bar = tqdm(total=n_cells, initial=n_cells - left, desc="bench cells", unit="cell", disable=not progress)
    said: set = set()  # (detector, reason) already logged

    def finish(cells: list[list[dict]]) -> None:
        for records in cells:
            _append_cell(results, records, said)
            bar.update(1)

    if isinstance(executor, SerialExecutor) or isinstance(executor, LocalExecutor) and len(todo) <= 1:
        for unit in todo:
            finish(runner.run_unit(unit))
    else:
        for _, cells in executor.map_unordered(_worker_runner, (config, str(out)), BenchRunner.run_unit, todo):
            finish(cells)
    bar.close()
    write_json(out / "provenance.json", provenance(config, runner, time.perf_counter() - started, left))


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


def provenance(config: BenchConfig, runner: BenchRunner, seconds: float, cells_run: int) -> dict:
    """What a reviewer needs to trust or repeat the run: versions, seeds, data hashes, timings."""
    data = runner.evaluation.scenario.data
    return {
        "domain": runner.evaluation.scenario.kind,
        "packages": package_versions(), "compute": runtime_info(config.scenario.train.device),
        "config_hash": stable_hash(to_dict(config)),
        "seeds": {"train": config.scenario.train.seed, "targets": config.attack.targets.seed,
                  "attack": config.attack.seeds},
        "data": {"train_hash": data.train.content_hash(), "test_hash": data.test.content_hash(),
                 "n_train": len(data.train), "n_test": len(data.test)},
        "class_names": getattr(data.train, "class_names", None),
        "training": {name: {k: v for k, v in victim.trained.metrics.items() if k != "history"}
                     for name, victim in runner.victims.items()},
        "task_quality": runner.evaluation.quality,
        "seconds_this_invocation": round(seconds, 2), "cells_run_this_invocation": cells_run,
        "shared_stage_seconds": {"influence_factors": runner.evaluation.context.timings.get("factors")},
    }


# --------------------------------------------------------------------------- CLI
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help=f"YAML bench config or a built-in name (default: {DEFAULT_CONFIG}, the quick digits benchmark; "
                        "bench-digits-thorough for more targets, bench-digits-adaptive for the detector-aware "
                        "attacker's sweep, bench-digits-hardening for mitigations, bench-caesar and bench-wordpref "
                        "for language models)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="run directory (default: runs/bench)")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"workers running cells in parallel, each with --threads torch threads (default: local "
                        f"{DEFAULT_WORKERS}, this machine's cores up to 4; ray: as many as the cluster holds)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the cells run: local processes (default) or a Ray cluster (pip install "
                        "'infusion-audit[ray]')")
    p.add_argument("--address", default=None, help="ray: the cluster's address, as ray.init takes it (default: "
                   "start a local instance)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs each worker declares (default: 0)")
    p.add_argument("--no-report", action="store_true", help="skip rendering report.html")


def run_bench(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", "", "an integer >= 1", args.jobs)
    started = time.perf_counter()
    result = bench(args.config, args.out, jobs=args.jobs, progress=not args.quiet, report=not args.no_report,
                   executor=args.executor, address=args.address, gpus_per_worker=args.gpus_per_worker,
                   device=getattr(args, "device", None))
    print(f"finished in {time.perf_counter() - started:.0f} s")
    print(f"results: {args.out / 'results.jsonl'}")
    if result.report is not None:
        print(f"report: {result.report}")
    return 0
