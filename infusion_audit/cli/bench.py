"""`infusion-audit bench`: attack, detect, remove, retrain, then report.html, verdict.json and, with `--junit`, a
JUnit file; judged by the config's `policy` (and `--fail-on`), the command exits with POLICY_FAILED when a rule
fails, saying which in one line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import yaml

from ..bench import DEFAULT_CONFIG, audit, prepare
from ..config import AuditConfig, PolicyConfig, from_dict, to_dict
from ..errors import ConfigError
from ..executors import DEFAULT_WORKERS, EXECUTORS

POLICY_FAILED = 3  # the exit code of a bench whose policy fails (0: passed; 2: could not run as asked)
POLICY_KEYS = tuple(f.name for f in dataclasses.fields(PolicyConfig))


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


def with_fail_on(config: AuditConfig, items: list[str]) -> AuditConfig:
    """The config with each ``--fail-on KEY=VALUE`` set in its policy section (a YAML value, checked as the
    section is)."""
    if not items:
        return config
    policy = to_dict(config.policy)
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        if key not in POLICY_KEYS or not sep:
            raise ConfigError("--fail-on", item, f"KEY=VALUE with KEY one of {', '.join(POLICY_KEYS)}, "
                                                 "e.g. undetected_at=model")
        try:
            policy[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError("--fail-on", item, "a value written in YAML") from None
    return dataclasses.replace(config, policy=from_dict(PolicyConfig, policy, "--fail-on", "policy"))


def run_audit(args: argparse.Namespace, detect: bool):
    """Prepare the config (with `--fail-on`, where the command has it) and run its grid as the arguments say;
    prints the time and where the results are."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", "", "an integer >= 1", args.jobs)
    started = time.perf_counter()
    config = with_fail_on(prepare(args.config, args.device, args.threads, args.set), getattr(args, "fail_on", []))
    result = audit(config, args.out, jobs=args.jobs, progress=not args.quiet, detect=detect, executor=args.executor,
                   address=args.address, gpus_per_worker=args.gpus_per_worker)
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
    p.add_argument("--no-report", action="store_true", help="skip rendering report.html (verdict.json is written)")
    p.add_argument("--fail-on", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a rule of the policy the run is judged by, over the config's policy section (keys: "
                        f"{', '.join(POLICY_KEYS)}), e.g. undetected_at=model or max_mitigated_effect=0.5; "
                        f"repeatable; the command exits with {POLICY_FAILED} when a rule fails")
    p.add_argument("--junit", type=Path, metavar="FILE",
                   help="also write the verdict as JUnit XML: one test case per attack x level of the defender's "
                        "knowledge, one per plugin error and one per rule of the policy")


def run(args: argparse.Namespace) -> int:
    from ..reports.junit import write_junit

    result = run_audit(args, detect=True)
    if not args.no_report:
        print(f"report: {result.write_report()}")
    verdict = result.write_verdict()
    print(f"verdict: {result.run_dir / 'verdict.json'}")
    if args.junit is not None:
        print(f"junit: {write_junit(verdict, args.junit)}")
    policy = verdict["policy"]
    for failure in policy["failures"]:
        print(f"infusion-audit: policy failed: {failure['rule']}: {failure['reason']}", file=sys.stderr)
    if not policy["passed"]:
        return POLICY_FAILED
    if policy["rules"]:
        print("policy passed: " + ", ".join(f"{k}={v}" for k, v in policy["rules"].items()))
    return 0
