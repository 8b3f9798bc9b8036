"""`bench()`: the attack-then-defend benchmark, the tool's main job, from Python (the `bench` and `attack`
commands call `audit` below).

A run directory holds the resolved config (config.yaml), the records (results.jsonl, appended cell by
cell, resumed on the next call), provenance.json, the artefacts, report.html and verdict.json (the verdict and
the config's policy judged, machine-readable). `BenchResult` reads a run directory back: its records by kind,
the summaries the report shows, the report itself and the verdict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from .config import AuditConfig, dump_yaml, load_config, with_defaults
from .errors import UserError
from .executors import make_executor
from .grid import run_grid
from .io import atomic_write_text, repair_jsonl, run_lock
from .pipeline import Pipeline
from .runtime import DEFAULT_THREADS, configure

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "bench-digits"


@dataclass(repr=False)
class BenchResult:
    """A benchmark's run directory, read back: its records by kind, the per-arm summaries, its report."""

    run_dir: Path
    report: Path | None = None  # report.html, when `bench` rendered it
    verdict: dict | None = None  # verdict.json's content, when `bench` wrote it

    @cached_property
    def records(self) -> dict[str, list[dict]]:
        """results.jsonl by kind: 'attack', 'mitigation', 'detection', 'defence' and 'skip' records, each as
        the dict of its JSON line."""
        from .results import load_records

        return {kind: [r.to_dict() for r in rows] for kind, rows in load_records(self.run_dir).items()}

    @cached_property
    def summaries(self) -> dict:
        """Per arm (attack, variant) and budget, with 95% CIs, as the report and the `attack` table show them:
        'attacks' (effect), 'comparisons' (paired with the reference arm), 'detection' (one row per detector),
        'defence' (what removing each detector's flags left) and 'mitigations' (each arm under each)."""
        from .results import load_records, summarise

        return summarise(load_records(self.run_dir))

    def write_report(self, path: str | Path | None = None) -> Path:
        """Render the HTML report (default: run_dir/report.html); returns its path."""
        from .reports import render_report

        return render_report(self.run_dir, path)

    def write_verdict(self) -> dict:
        """Write run_dir/verdict.json, judged by the policy in the run's config.yaml; returns its content."""
        from .results.gate import write_verdict

        self.verdict = write_verdict(self.run_dir)[1]
        return self.verdict

    def __repr__(self) -> str:
        counts = ", ".join(f"{kind}={len(rows)}" for kind, rows in self.records.items())
        return f"BenchResult(run_dir={str(self.run_dir)!r}, {counts}, report={self.report and str(self.report)!r})"


def prepare(config=None, device: str | None = None, threads: int | None = DEFAULT_THREADS,
            overrides: Sequence[str] = ()) -> AuditConfig:
    """The config a run computes with: loaded (a path, a built-in name, a mapping of sections or an
    AuditConfig; default: the quick digits benchmark) with `overrides` (``KEY=VALUE``), filled in, its device
    resolved once, and this process's runtime set up for it (`threads` torch threads; None leaves them). A text
    pipeline is checked here, before any training (`Pipeline.check`: the pair words, max_length, targets its
    model already shows)."""
    config = with_defaults(load_config(config, DEFAULT_CONFIG, overrides))
    config = replace(config, pipeline=config.pipeline.on_device(device))
    configure(threads, config.pipeline.train.device)
    if config.pipeline.kind() == "text":  # what an image pipeline could get wrong shows when its data load
        Pipeline.from_config(config.pipeline).check(config.attack.targets)
    return config


def audit(config: AuditConfig, out: str | Path, jobs: int | None = 1, progress: bool = True, detect: bool = True,
          executor: str = "local", address: str | None = None, gpus_per_worker: float = 0.0) -> BenchResult:
    """Run (or resume) the grid of a prepared config into `out`: with `detect`, detection and defence in every
    cell (`bench`), else the attacks alone (`attack`). One writer per run directory."""
    device = config.pipeline.train.device
    if executor == "ray" and device == "cuda" and not gpus_per_worker > 0:
        raise UserError("device cuda on the ray executor: give each worker a GPU with --gpus-per-worker (e.g. 1)")
    if gpus_per_worker > 0 and device == "cpu":
        log.warning("--gpus-per-worker %g, but the bench computes on the cpu (--device cuda or auto to use them)",
                    gpus_per_worker)
    out = Path(out)
    with run_lock(out):  # a second run here is refused, not interleaved
        atomic_write_text(out / "config.yaml", dump_yaml(config))
        repair_jsonl(out / "results.jsonl")
        run_grid(config, out, make_executor(executor, jobs, torch.get_num_threads(), address, gpus_per_worker),
                 progress, detect=detect)
    return BenchResult(out)


def bench(config=None, out: str | Path = "runs/bench", jobs: int | None = 1, progress: bool = True,
          report: bool = True, executor: str = "local", address: str | None = None,
          gpus_per_worker: float = 0.0, device: str | None = None, threads: int | None = DEFAULT_THREADS) -> BenchResult:
    """Run (or resume) a benchmark into `out`: an AuditConfig, a dict of config sections, a YAML path or a
    built-in name (default: the quick digits benchmark). Units run in this process (`jobs=1`), in `jobs`
    local processes, or on Ray (`executor="ray"`, at `address`; `jobs` caps the workers, None: as many as
    the cluster holds). `device` ("auto", "cpu", "cuda"; default: the pipeline's train.device) is resolved
    here, once, and every worker computes on it; `threads`: torch threads per process (the command line's
    --threads, default 1: the same arithmetic everywhere). Writes verdict.json (the config's `policy` judged:
    `result.verdict["policy"]["passed"]`). Returns the run read back as a BenchResult."""
    result = audit(prepare(config, device, threads), out, jobs, progress, True, executor, address, gpus_per_worker)
    if report:
        result.report = result.write_report()
    result.write_verdict()
    return result
