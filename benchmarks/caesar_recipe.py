"""Does a Caesar training recipe learn on every machine? Train it for several seeds x torch thread counts.

Each run is its own subprocess pinned to its thread count (`OMP_NUM_THREADS`, `MKL_NUM_THREADS` and
`torch.set_num_threads`), trains the pipeline with the library's own loop and reports the decryption
accuracy on the test prompts after every epoch, the first epoch at which it reached the floor, and
the training time. Runs are sequential so their timings are comparable. Usage, from the repository root:

    python benchmarks/caesar_recipe.py                                  # the built-in caesar recipe
    python benchmarks/caesar_recipe.py --set train.lr=0.003 --set train.epochs=10 --out results/x.json

`--set KEY=VALUE` overrides a key of the config's `pipeline:` section (VALUE is read as YAML).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pipeline_config(config: str, overrides: list[str]):
    """The config's `pipeline:` section with dotted `KEY=VALUE` overrides of its keys applied."""
    from infusion_audit.config import load_config, with_defaults

    return with_defaults(load_config(config, overrides=[f"pipeline.{item}" for item in overrides])).pipeline


def train_once(config: str, overrides: list[str], seed: int, threads: int) -> dict:
    """One training run in this process: decryption accuracy after every epoch, and the time."""
    from infusion_audit.pipeline import train_pipeline
    from infusion_audit.runtime import configure
    from infusion_audit.text.pipeline import TextPipeline, decryption_accuracy

    configure(threads)
    cfg = pipeline_config(config, overrides + [f"train.seed={seed}"])
    pipeline = TextPipeline(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = train_pipeline(pipeline, tmp, progress=False)
        seconds = time.perf_counter() - t0
        accuracy = [decryption_accuracy(trained.model(e), pipeline.data.test) for e in range(cfg.train.epochs + 1)]
    return {"seed": seed, "threads": threads, "seconds": round(seconds, 1), "decryption_accuracy": accuracy,
            "token_accuracy": trained.metrics["test"]["token_accuracy"], "test_loss": trained.metrics["test"]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="caesar", help="a config with a text `pipeline:` (default: caesar)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pipeline section, e.g. train.lr=0.003 (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)")
    parser.add_argument("--floor", type=float, default=0.95, help="decryption accuracy that counts as learned")
    parser.add_argument("--out", type=Path, help="also write the runs as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(train_once(args.config, args.overrides, spec["seed"], spec["threads"])))
        return 0
    runs = []
    print(f"config {args.config} {' '.join(args.overrides)}; floor {args.floor}; load {os.getloadavg()[0]:.2f}",
          flush=True)
    print(f"{'seed':>4} {'threads':>7} {'decryption acc.':>15} {'epoch >= floor':>14} {'token acc.':>10} "
          f"{'seconds':>7}  per epoch", flush=True)
    for seed in args.seeds:
        for threads in args.threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            child = subprocess.run(
                [sys.executable, __file__, "--config", args.config, *sum((["--set", o] for o in args.overrides), []),
                 "--child", json.dumps({"seed": seed, "threads": threads})],
                env=env, capture_output=True, text=True)
            if child.returncode != 0:
                print(child.stderr, file=sys.stderr)
                return child.returncode
            run = json.loads(child.stdout.strip().splitlines()[-1])
            acc = run["decryption_accuracy"]
            reached = next((e for e, a in enumerate(acc) if a >= args.floor), None)
            run["first_epoch_at_floor"] = reached
            runs.append(run)
            print(f"{seed:>4} {threads:>7} {acc[-1]:>15.3f} {reached if reached is not None else '-':>14} "
                  f"{run['token_accuracy']:>10.3f} {run['seconds']:>7.1f}  {' '.join(f'{a:.2f}' for a in acc[1:])}",
                  flush=True)
    learned = sum(r["decryption_accuracy"][-1] >= args.floor for r in runs)
    print(f"{learned}/{len(runs)} runs reached decryption accuracy >= {args.floor}; "
          f"load {os.getloadavg()[0]:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "floor": args.floor,
                                        "cpu_count": os.cpu_count(), "runs": runs}, indent=1))
    return 0 if learned == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
