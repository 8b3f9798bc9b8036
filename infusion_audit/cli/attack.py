"""`infusion-audit attack`: the bench's grid without detection and defence; prints each arm's effect against
its clean control and the paired comparisons. `infusion-audit report DIR` renders the run's page."""

from __future__ import annotations

import argparse

from ..results import format_table
from .bench import add_grid_arguments, run_audit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="digits",
                   help="YAML config with `pipeline:` and `attack:` sections, or a built-in name (default: digits)")
    add_grid_arguments(p, "runs/attack")


def run(args: argparse.Namespace) -> int:
    result = run_audit(args, detect=False)
    print(format_table(result.summaries))
    return 0
