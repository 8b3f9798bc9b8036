"""`infusion-audit train`: train a config's pipeline alone (a checkpoint per epoch, metrics.json)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import dump_yaml, load_config, with_defaults
from ..io import atomic_write_text
from ..pipeline import Pipeline, train_pipeline
from .bench import add_set_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config with a `pipeline:` section, or a built-in name such as digits")
    p.add_argument("--out", required=True, type=Path, help="run directory for checkpoints and metrics")
    add_set_argument(p)


def run(args: argparse.Namespace) -> int:
    config = with_defaults(load_config(args.config, overrides=args.set))
    pipeline = config.pipeline.on_device(args.device)
    atomic_write_text(args.out / "config.yaml", dump_yaml(dataclasses.replace(config, pipeline=pipeline)))
    trained = train_pipeline(Pipeline.from_config(pipeline), args.out / "artefacts", progress=not args.quiet)
    m = trained.metrics
    summary = ", ".join(f"test {name.replace('_', ' ')} {value:.4f}" for name, value in m["test"].items())
    summary += f" (n={m['n_test']}); {m['quality']['figure']} {m['quality']['value']:.4f}"
    print(f"{summary}, {m['train_seconds']:.1f}s; checkpoints in {trained.checkpoints[0].parent}")
    return 0
