"""`infusion-audit report`: (re)render the HTML page of a bench or attack run, or of a scan."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..reports import render_report, render_scan_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory from `bench` or `attack` (results.jsonl) or `scan` "
                                              "(scores.csv)")
    p.add_argument("--out", type=Path, help="HTML file to write (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    is_scan = (args.run_dir / "scores.csv").exists() and not (args.run_dir / "results.jsonl").exists()
    path = (render_scan_report if is_scan else render_report)(args.run_dir, args.out)
    print(f"report written to {path}")
    return 0
