"""`infusion-audit bench`: attack, detect, remove, retrain, then report.html."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..bench import DEFAULT_CONFIG, audit, prepare
from ..errors import ConfigError
from ..executors import DEFAULT_WORKERS, EXECUTORS


def add_grid_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    """What `bench` and `attack` share: where the run goes and where its cells run."""
    p.add_argument("--out", type=Path, default=Path(default_out), help=f"run directory (default: {default_out})")
    add_set_argument(p)
    p.add_argument("--jobs", type=int, default=None,
                   help=f"workers running cells in parallel, each with --threads torch threads (default: local "
                        f"{DEFAULT_WORKERS}, this machine's cores up to 4; ray: as many as the cluster holds)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the cells run: local processes (default) or a Ray cluster (pip install "
                        "'infusion-audit[ray]')")
    p.add_argument("--address", default=None, help="ray: the cluster's address, as ray.init takes it (default: "
                   "start a local instance)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs each worker declares (default: 0)")


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (a dotted key, a YAML value), e.g. pipeline.train.seed=1; repeatable")


def run_audit(args: argparse.Namespace, detect: bool):
    """Prepare the config and run its grid as the arguments say; prints the time and where the results are."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", "", "an integer >= 1", args.jobs)
    started = time.perf_counter()
    result = audit(prepare(args.config, args.device, args.threads, args.set), args.out, jobs=args.jobs, progress=not args.quiet,
                   detect=detect, executor=args.executor, address=args.address, gpus_per_worker=args.gpus_per_worker)
    print(f"finished in {time.perf_counter() - started:.0f} s")
    print(f"results: {args.out / 'results.jsonl'}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help=f"YAML config or a built-in name (default: {DEFAULT_CONFIG}, the quick digits benchmark; "
                        "bench-digits-thorough for more targets, bench-digits-adaptive for the detector-aware "
                        "attacker's sweep, bench-digits-hardening for mitigations, bench-caesar and bench-wordpref "
                        "for language models)")
    add_grid_arguments(p, "runs/bench")
    p.add_argument("--no-report", action="store_true", help="skip rendering report.html")


def run(args: argparse.Namespace) -> int:
    result = run_audit(args, detect=True)
    if not args.no_report:
        print(f"report: {result.write_report()}")
    return 0
