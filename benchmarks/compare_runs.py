"""Two bench runs' records, compared one by one with timings aside: did a change of code change any result?

    python benchmarks/compare_runs.py BEFORE_RUN AFTER_RUN

Records are matched on what they measure (kind, victim, variant, mitigation, detector, target, attack, budget,
seed, repeat), not on the cell key, which hashes the attack's params and so changes whenever an attack gains a
parameter. Records of schema 1 are read as today's (`scenario` is `dataset`); a field that is null on one side
and absent on the other is equal; fields and params the after-run adds are listed, not compared; `artefact` (a
path named by the cell key) is not compared. Prints the differing records (the first few in full) and a count.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

TIMING = ("seconds", "timings", "time", "elapsed")
MATCH = ("kind", "victim", "variant", "mitigation", "detector", "target", "attack", "budget", "seed", "repeat")
SHOWN = 3


def comparable(value):
    """A record (or part of one) without timings, nulls and the schema field, in today's names."""
    if isinstance(value, dict):
        return {("dataset" if k == "scenario" else k): comparable(v) for k, v in value.items()
                if v is not None and k != "schema" and not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def by_measurement(run: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in (run / "results.jsonl").read_text().splitlines():
        if line.strip():
            record = comparable(json.loads(line))
            groups[json.dumps([record.get(k) for k in MATCH], sort_keys=True)].append(record)
    return groups


def differences(before: dict, after: dict, added: Counter) -> list[dict]:
    """Each field (or param) of `before` that `after` gives another value; what `after` adds goes to `added`."""
    before, after = dict(before), dict(after)
    for record in (before, after):
        record.pop("cell", None), record.pop("artefact", None)
    params_before, params_after = before.pop("params", None) or {}, after.pop("params", None) or {}
    added.update(f"params.{p}" for p in set(params_after) - set(params_before))
    added.update(f"{after.get('kind')}.{f}" for f in set(after) - set(before))
    changed = {f"params.{p}": (v, params_after[p]) for p, v in params_before.items()
               if p in params_after and params_after[p] != v}
    changed.update({f: (v, after.get(f)) for f, v in before.items() if after.get(f) != v})
    return [changed] if changed else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = by_measurement(args.before), by_measurement(args.after)
    added: Counter = Counter()
    unmatched = [k for k in set(before) | set(after) if len(before.get(k, [])) != len(after.get(k, []))]
    differ = []
    for key, records in before.items():
        if len(after.get(key, [])) != len(records):
            continue
        for old, new in zip(sorted(records, key=json.dumps), sorted(after[key], key=json.dumps)):
            differ += differences(old, new, added)
    for changed in differ[:SHOWN]:
        print("differs:", json.dumps(changed, default=str)[:600])
    counts = {name: Counter(r["kind"] for rs in groups.values() for r in rs)
              for name, groups in (("before", before), ("after", after))}
    print(f"before {sum(counts['before'].values())} records {dict(counts['before'])}, after "
          f"{sum(counts['after'].values())} {dict(counts['after'])}; unmatched measurements {len(unmatched)}; "
          f"records that differ {len(differ)}")
    if added:
        print("added by the after-run (not compared):", ", ".join(f"{k} ({n})" for k, n in sorted(added.items())))


if __name__ == "__main__":
    main()
