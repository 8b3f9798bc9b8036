"""Time and peak memory of each stage of an audit, and how they grow with the data.

Stages: training (per epoch), IHVP per backend (exact CG, EK-FAC fit + solve), influence scores,
PGD per poisoned document, the retrain, and each detector. Run on digits (the built-in default) and
on generated CIFAR-sized data (3x32x32, the paper's TinyResNet) at several training-set sizes and
numbers of poisoned documents. Writes JSON; the README beside this file summarises it.

    python benchmarks/stages.py --out benchmarks/results/stages.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from infusion_audit.attacks.base import AttackContext
from infusion_audit.attacks.infusion import Infusion
from infusion_audit.behaviour import sample_targets
from infusion_audit.config import InfluenceConfig, PipelineConfig, PluginSpec, TrainConfig
from infusion_audit.data import DatasetSplit, ImageDataset
from infusion_audit.io import write_json
from infusion_audit.pipeline import Pipeline, train_pipeline
from infusion_audit.runtime import configure


class PeakRSS:
    """Samples the process's resident memory every 5 ms; `peak_mib` is the peak above the start."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    @contextmanager
    def measure(self, into: dict, name: str):
        start, peak, stop = self.rss(), [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], self.rss())
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            thread.join()
            into[name] = {"seconds": round(seconds, 4), "peak_mib": round(max(0, peak[0] - start) / 2**20, 1)}


def synthetic_cifar(n_train: int, n_test: int = 200, seed: int = 0) -> DatasetSplit:
    """CIFAR-sized 8-bit images with class structure (a per-class colour pattern plus noise), so training
    behaves like training and every stage does its real amount of work."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0.2, 0.8, size=(10, 3, 32, 32)).astype(np.float32)

    def make(n: int) -> ImageDataset:
        y = rng.integers(0, 10, size=n)
        x = np.clip(patterns[y] + rng.normal(0, 0.15, size=(n, 3, 32, 32)), 0, 1)
        return ImageDataset(np.round(x * 255) / 255, y, num_classes=10, grid=1 / 255, name="synthetic-cifar")

    return DatasetSplit(make(n_train), make(n_test))


def profile(pipeline: Pipeline, workdir: Path, n_poison: list[int], backends: list[str], mem: PeakRSS,
            detectors: bool) -> dict:
    stages: dict = {}
    cfg = pipeline.train_cfg
    with mem.measure(stages, "train_all_epochs"):
        trained = train_pipeline(pipeline, workdir, progress=False)
    stages["train_epoch"] = {"seconds": round(stages["train_all_epochs"]["seconds"] / cfg.epochs, 4)}
    model = trained.model()
    train = pipeline.data.train
    target = sample_targets(pipeline.data.test, 1, seed=0)[0]
    for backend in backends:  # the last backend's context is the one the attack uses
        context = AttackContext(pipeline, trained, influence=InfluenceConfig(backend=backend, damping=1e-3))
        with mem.measure(stages, f"ihvp_{backend}_setup"):
            context.ihvp()
        with mem.measure(stages, f"ihvp_{backend}_solve"):
            context.query(target)
        with mem.measure(stages, f"influence_scores_{backend}"):
            context.scores(target)
    poisons = {}
    for k in n_poison:
        attack = Infusion(k=k, eps=8 / 255 if train.grid == 1 / 255 else 1 / 16, steps=20, preset="influence")
        timing: dict = {}
        with mem.measure(timing, "craft"):
            poisoning = attack.craft(context, target)
        poisoned = poisoning.apply(train)
        with mem.measure(timing, "retrain_1_epoch"):
            pipeline.continue_training(trained.checkpoint(cfg.epochs - 1), poisoned)
        timing["pgd_per_document"] = round(poisoning.meta["timings"]["pgd"] / k, 5)
        timing["attack_over_epoch"] = round(
            (poisoning.meta["timings"]["pgd"] + stages[f"ihvp_{backends[-1]}_solve"]["seconds"]
             + stages[f"influence_scores_{backends[-1]}"]["seconds"]) / stages["train_epoch"]["seconds"], 3)
        poisons[str(k)] = timing
    stages["poisons"] = poisons
    if detectors:
        from infusion_audit.behaviour import ClassBehaviour
        from infusion_audit.scan import scan

        poisoned_model = pipeline.continue_training(trained.checkpoint(cfg.epochs - 1), poisoned)
        with mem.measure(stages, "scan_all_detectors"):
            result = scan(poisoned, model=poisoned_model, reference=train, truth=poisoning.indices,
                          behaviour=ClassBehaviour.from_target(target, pipeline.data.test), bootstrap=0,
                          expected_fraction=max(0.001, len(poisoning.indices) / len(train)), progress=False,
                          influence=InfluenceConfig(backend=backends[-1], damping=1e-3))
        stages["detectors"] = {label: {"seconds": round(run.seconds, 4),
                                       "docs_per_second": round(len(train) / max(run.seconds, 1e-9), 1)}
                               for label, run in result.completed}
        stages["detector_context"] = {k: round(v, 4) for k, v in result.context.timings.items()}
    return {"n_train": len(train), "n_parameters": sum(p.numel() for p in model.parameters()), "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stages.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--cifar-sizes", type=int, nargs="*", default=[250, 500, 1000])
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default: 2, the CI machine's cores)")
    args = parser.parse_args(argv)
    configure(args.threads)
    mem = PeakRSS()
    results = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "runs": []}
    digits = Pipeline.from_config(PipelineConfig())
    results["runs"].append({"dataset": "digits", "model": "digits-cnn",
                            **profile(digits, args.work, [7, 14, 28], ["exact", "ekfac"], mem, detectors=True)})
    print(json.dumps(results["runs"][-1], indent=1), file=sys.stderr)
    for n in args.cifar_sizes:
        config = PipelineConfig(dataset=PluginSpec("synthetic-cifar", {"n_train": n}),
                                model=PluginSpec("tiny-resnet"),
                                train=TrainConfig(lr=0.01, batch_size=16, epochs=2, seed=0))
        pipeline = Pipeline(config, synthetic_cifar(n))
        run = profile(pipeline, args.work, [10, 50], ["ekfac"], mem, detectors=n == args.cifar_sizes[-1])
        results["runs"].append({"dataset": "synthetic-cifar", "model": "tiny-resnet", **run})
        print(json.dumps(results["runs"][-1], indent=1), file=sys.stderr)
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
