"""`infusion-audit bench`: the attack-then-defend benchmark, the tool's main job.

A grid of attacks x budgets x targets x seeds on one scenario. Each cell crafts one poisoning on
the attacker's model, measures it on every victim (the same architecture, or others for transfer)
against a clean control, runs the detectors on the poisoned set, and for each detector removes
what it flags, retrains and measures what is left of the attack and what the removal cost. All
records of a cell are appended to results.jsonl in one write, so an interrupted run loses at most
the cell in flight and re-running the same command skips finished cells.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .behaviour import Target, measure
from .config import (PluginSpec, ScenarioConfig, dump_yaml, from_dict, from_sections, load_yaml, resolve_config_path,
                     to_dict)
from .data import dataset_kind
from .errors import ConfigError
from .evaluation import AttackConfig, AttackEvaluation, AttackRunConfig, AttackSpec, BudgetConfig, Victim
from .scan import ScanConfig
from .io import append_jsonl_many, atomic_write_text, read_jsonl, repair_jsonl, run_lock, stable_hash, write_json
from .runtime import set_threads, threads_info
from .training import accuracy

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "bench-digits"
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))
UNEDITED_METRICS = ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "recall_at_k")  # the null of each figure


@dataclass
class DefenceConfig:
    """Remove what each detector flags and retrain by the attack protocol on what is left."""

    enabled: bool = True


@dataclass
class BenchConfig:
    """A scenario, the attack grid and its budgets, the victims, the detectors (`scan`) and the defence."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    budgets: list[BudgetConfig] = field(default_factory=list)  # empty: attack.budget alone
    victims: list[PluginSpec] = field(default_factory=list)  # models trained on the poisoned set; empty: the scenario's
    scan: ScanConfig = field(default_factory=ScanConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)

    def grid_budgets(self) -> list[BudgetConfig]:
        return self.budgets or [self.attack.budget]

    def validate(self, source: str, prefix: str) -> None:
        from .registry import DETECTORS, MODELS

        for i, spec in enumerate(self.scan.detectors):
            if ":" not in spec.name and spec.name not in DETECTORS.names():
                raise ConfigError(source, f"scan.detectors[{i}].name",
                                  f"a known detector ({', '.join(DETECTORS.names())})", spec.name)
        for i, spec in enumerate(self.victims):
            if ":" not in spec.name and spec.name not in MODELS.names():
                raise ConfigError(source, f"victims[{i}].name", f"a known model ({', '.join(MODELS.names())})",
                                  spec.name)


@dataclass(frozen=True)
class Cell:
    """One (attack arm, budget, target, seed) of the grid."""

    spec_index: int
    budget_index: int
    target: Target
    seed: int
    key: str


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
                self.victims[name] = Victim.train(replace(config.scenario, model=spec), config.attack.protocol,
                                                  self.run_dir / "artefacts", progress=progress)

    def victim_name(self, spec: PluginSpec | None) -> str:
        spec = spec or self.config.scenario.model
        return spec.name + (f"({stable_hash(spec.params, 6)})" if spec.params else "")

    def cells(self) -> list[Cell]:
        cells, seen = [], set()
        attack = self.config.attack
        for b, budget in enumerate(self.config.grid_budgets()):
            for target in self.evaluation.targets():
                for seed in attack.seeds:
                    for s, spec in enumerate(attack.attacks):
                        key = self.evaluation.cell_id(spec, target, seed, budget)
                        if key not in seen:  # an attack that ignores eps is the same cell under two budgets
                            seen.add(key)
                            cells.append(Cell(s, b, target, seed, key))
        return cells

    def run_cell(self, cell: Cell) -> list[dict]:
        """Every record of one cell: the attack on each victim, then detection and defence on the main victim."""
        spec: AttackSpec = self.config.attack.attacks[cell.spec_index]
        budget = self.config.grid_budgets()[cell.budget_index]
        crafted = self.evaluation.craft(spec, cell.target, cell.seed, budget)
        records, main = [], None
        for name, victim in self.victims.items():
            record, poisoned_model = self.evaluation.record(crafted, victim)
            record["victim"] = name
            if main is None:
                main = (record, poisoned_model, victim)
            else:  # a transfer victim is its own arm in tables and charts
                record["variant"] = f"{record['variant']} → {name}".lstrip(" →")
            records.append(record)
        return records + self.detect_and_defend(crafted, *main)

    def detect_and_defend(self, crafted, record: dict, poisoned_model, victim: Victim) -> list[dict]:
        from .detectors import Behaviour
        from .detectors.base import SKIP_LOG
        from .scan import scan

        clean = self.evaluation.scenario.data.train
        test = self.evaluation.scenario.data.test
        poisoned_set = crafted.poisoned_set
        target = crafted.target
        t0 = time.perf_counter()
        options = self.config.scan
        with _silenced(SKIP_LOG):  # skip reasons go in the records; the driver says each once per run
            result = scan(poisoned_set, detectors=options.detectors or None, model=poisoned_model, reference=clean,
                          behaviour=Behaviour.from_target(target, test), truth=crafted.poisoning.indices,
                          expected_fraction=options.expected_fraction, influence=options.influence,
                          bootstrap=options.bootstrap, progress=False, features_layer=options.features_layer)
        scan_seconds = time.perf_counter() - t0
        common = {k: record[k] for k in ("cell", "scenario", "attack", "variant", "budget", "target", "seed",
                                         "victim")}
        out = []
        x_star = test.batch([target.index])[0][0]
        control = victim.control()
        truth = result.truth
        null = self.unedited_detection(crafted, result)
        for (label, run) in result.completed:
            out.append({"kind": "detection", **common, **result.detection[label], "detector": label,
                        "context_seconds": scan_seconds, **null.get(label, {})})
            if not self.config.defence.enabled:
                continue
            flagged = np.flatnonzero(run.flagged)
            t1 = time.perf_counter()
            defended = victim.retrain(poisoned_set.without(flagged))
            # the same documents removed from the clean set: what is left is the attack's, not the removal's
            removed_control = victim.retrain(clean.without(flagged))
            after, baseline = measure(defended, x_star, target.cls), measure(removed_control, x_star, target.cls)
            out.append({"kind": "defence", **common, "detector": label, "knowledge": run.knowledge,
                        "removed": int(run.flagged.sum()), "removed_poisons": int((run.flagged & truth).sum()),
                        "p_after": after["p"], "p_control_removed": baseline["p"],
                        "delta_p_after": after["p"] - baseline["p"], "delta_p_before": record["delta_p"],
                        "delta_logodds_after": after["logodds"] - baseline["logodds"],
                        "delta_logodds_before": record["delta_logodds"],
                        "flip_after": after["top1"] and not baseline["top1"],
                        "acc_after": accuracy(defended, test), "acc_control": control["accuracy"],
                        "acc_control_removed": accuracy(removed_control, test),
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
        from .detectors import Behaviour, build_detector, run_detector
        from .detectors.base import SKIP_LOG
        from .scan import evaluate_run, truth_mask

        clean, poisoning = self.evaluation.scenario.data.train, crafted.poisoning
        bounded = crafted.attack.get_params().get("eps") is not None  # probe insertion replaces, unbounded
        if not bounded or not np.array_equal(poisoning.y, clean.y[poisoning.indices]):
            return {}
        context = self.unedited_context  # the unedited documents are the clean set's own
        context.behaviour = Behaviour.from_target(crafted.target, self.evaluation.scenario.data.test)
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
        from .detectors import AuditContext

        clean, options = self.evaluation.scenario.data.train, self.config.scan
        return AuditContext(clean, model=self.evaluation.victim.control()["model"], reference=clean,
                            expected_fraction=options.expected_fraction, progress=False,
                            features_layer=options.features_layer,
                            **({"influence": dict(options.influence)} if options.influence else {}))


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


# --------------------------------------------------------------------------- parallel workers
_WORKER: BenchRunner | None = None


def _init_worker(config: BenchConfig, run_dir: str, threads: int) -> None:
    global _WORKER
    set_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)
    _WORKER = BenchRunner(config, run_dir, progress=False)


def _run_in_worker(cell: Cell) -> list[dict]:
    assert _WORKER is not None
    return _WORKER.run_cell(cell)


# --------------------------------------------------------------------------- the entry point
def load_bench_config(config=None):
    """A BenchConfig, or a TextAuditConfig when the scenario's dataset is a text corpus, from a YAML path,
    a built-in name (default: the quick digits benchmark) or a dict of sections, checked as a file is."""
    if isinstance(config, dict):
        data, source = config, "<dict>"
    else:
        data, source = load_yaml(resolve_config_path(config or DEFAULT_CONFIG))
    scenario = from_dict(ScenarioConfig, data.get("scenario"), source, "scenario")
    if dataset_kind(scenario.dataset) == "text":
        from .text.evaluation import TextAuditConfig

        return from_sections(TextAuditConfig, data, source)
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
        'detection' (one row per detector), 'defence' (what removing each detector's flags left) and the
        'defence_measure' those rows compare ('delta_logodds')."""
        from .reports.render import summarise_run

        return summarise_run(self.records)

    def write_report(self, path: str | Path | None = None) -> Path:
        """Render the HTML report (default: run_dir/report.html); returns its path."""
        from .reports import render_report

        return render_report(self.run_dir, path)

    def __repr__(self) -> str:
        counts = ", ".join(f"{kind}={len(rows)}" for kind, rows in self.records.items())
        return f"BenchResult(run_dir={str(self.run_dir)!r}, {counts}, report={self.report and str(self.report)!r})"


def bench(config=None, out: str | Path = "runs/bench", jobs: int = 1, progress: bool = True,
          report: bool = True) -> BenchResult:
    """Run (or resume) a benchmark into `out`: a BenchConfig, a text config, a dict of config sections, a YAML
    path or a built-in name (default: the quick digits benchmark). Returns the run read back as a BenchResult."""
    if config is None or isinstance(config, (dict, str, Path)):
        config = load_bench_config(config)
    elif not hasattr(config, "scenario"):
        raise ConfigError("<config>", "", "a dict of sections, a YAML path, a built-in name or a BenchConfig",
                          type(config).__name__)
    out = Path(out)
    with run_lock(out):  # one writer per run directory: a second bench here is refused, not interleaved
        atomic_write_text(out / "config.yaml", dump_yaml(config))
        repair_jsonl(out / "results.jsonl")
        if isinstance(config, BenchConfig):
            run_image_bench(config, out, jobs, progress)
        else:
            from .text.bench import run_text_bench

            run_text_bench(config, out, progress)
        result = BenchResult(out)
        if report:
            result.report = result.write_report()
    return result


def run_image_bench(config: BenchConfig, out: Path, jobs: int = 1, progress: bool = True) -> None:
    started = time.perf_counter()
    results = out / "results.jsonl"
    runner = BenchRunner(config, out, progress=progress)
    cells = runner.cells()
    done = {r["cell"] for r in read_jsonl(results) if r.get("kind") == "attack"}
    todo = [c for c in cells if c.key not in done]
    log.info("%d cells, %d already finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="bench cells", unit="cell",
               disable=not progress)
    said: set = set()  # (detector, reason) already logged
    if jobs <= 1 or len(todo) <= 1:
        for cell in todo:
            _append_cell(results, runner.run_cell(cell), said)
            bar.update(1)
    else:
        import multiprocessing

        threads = threads_info()["torch_threads"]  # the workers compute as this process does (--threads)
        with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(config, str(out), threads)) as pool:
            pending = [pool.submit(_run_in_worker, cell) for cell in todo]
            try:
                for future in futures.as_completed(pending):
                    _append_cell(results, future.result(), said)
                    bar.update(1)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    bar.close()
    write_json(out / "provenance.json", provenance(config, runner, time.perf_counter() - started, len(todo)))


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
        "packages": package_versions(), "compute": threads_info(), "config_hash": stable_hash(to_dict(config)),
        "seeds": {"train": config.scenario.train.seed, "targets": config.attack.targets.seed,
                  "attack": config.attack.seeds},
        "data": {"train_hash": data.train.content_hash(), "test_hash": data.test.content_hash(),
                 "n_train": len(data.train), "n_test": len(data.test)},
        "class_names": data.train.class_names,
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
                        "attacker's sweep)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="run directory (default: runs/bench)")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help=f"cells run in parallel processes, each with --threads torch threads (default: "
                        f"{DEFAULT_JOBS}, this machine's cores up to 4)")
    p.add_argument("--no-report", action="store_true", help="skip rendering report.html")


def run_bench(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError("--jobs", "", "an integer >= 1", args.jobs)
    started = time.perf_counter()
    result = bench(args.config, args.out, jobs=args.jobs, progress=not args.quiet, report=not args.no_report)
    print(f"finished in {time.perf_counter() - started:.0f} s")
    print(f"results: {args.out / 'results.jsonl'}")
    if result.report is not None:
        print(f"report: {result.report}")
    return 0
