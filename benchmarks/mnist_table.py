"""Print the paired table of every arm recorded in a mnist_attacker run directory (no computation).

    python benchmarks/mnist_table.py runs/mnist_attacker [--victim default] [--arms a b c]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mnist_attacker import format_table, paired_table  # noqa: E402

from infusion_audit.io import read_jsonl  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--victim", default="default")
    p.add_argument("--arms", nargs="*", default=None)
    p.add_argument("--reference", nargs="+", default=["today", "probe-x1"])
    p.add_argument("--topline", default="probe-xk")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    records: dict[str, dict] = {}
    budget = {}
    for r in read_jsonl(args.run / "results.jsonl"):
        if r.get("victim", "default") != args.victim:
            continue
        records.setdefault(r["arm"], {})[json.dumps(r["target"], sort_keys=True)] = r  # the last record wins
        budget = r["budget"] if r["attack"] == "infusion" else budget
    names = args.arms or list(records)
    rows = {name: list(records[name].values()) for name in names if name in records}
    summary = paired_table(rows, args.reference, args.topline)
    summary.update({"victim": args.victim, "k": budget.get("k"), "eps": budget.get("eps") or 0})
    print(format_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
