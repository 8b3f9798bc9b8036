"""The paper's CIFAR-10 protocol as a bench through the Ray executor (README: "Running on a Ray cluster"),
on the tiny CIFAR-format fixture: the same records as in one process, timings aside."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from infusion_audit import bench
from infusion_audit.config import BUILTIN_CONFIGS
from infusion_audit.io import read_jsonl


def shrunk_paper_config(root) -> dict:
    """cifar10-paper on the fixture: seconds on a CPU, every arm and the defence kept."""
    config = yaml.safe_load((BUILTIN_CONFIGS / "cifar10-paper.yaml").read_text())
    config["pipeline"]["dataset"]["params"].update(root=str(root), validation=12)
    config["pipeline"]["train"].update(device="cpu", epochs=2)
    config["pipeline"]["quality_floor"] = 0.0  # random fixture images: there is nothing to learn
    config["attack"].update(targets={"n": 2, "seed": 0}, budget={**config["attack"]["budget"], "k": 4})
    config["attack"]["attacks"][0]["params"]["steps"] = 3
    config["scan"] = {"bootstrap": 0}
    config["defence"] = {"detectors": ["loss-outlier", "influence-outlier"]}
    return config


@pytest.mark.slow
def test_cifar10_paper_bench_through_ray_equals_one_process(cifar10_root, tmp_path):
    ray = pytest.importorskip("ray")
    from ray import cloudpickle
    from torchvision.datasets import CIFAR10

    # The fixture swapped torchvision's official checksums for its own files in this process only; Ray's
    # workers get the same swap from a setup hook (they still verify every batch before reading it).
    swapped = {name: getattr(CIFAR10, name) for name in ("train_list", "test_list", "meta")}

    def swap_checksums() -> None:
        for name, value in swapped.items():
            setattr(CIFAR10, name, value)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if ray.is_initialized():
        ray.shutdown()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # Ray's workers put the driver's directory first on sys.path: not the repo root
    try:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": swap_checksums})
    finally:
        os.chdir(cwd)
    try:
        config = shrunk_paper_config(cifar10_root)
        bench(config, tmp_path / "ray", jobs=2, executor="ray", progress=False, report=False)
    finally:
        ray.shutdown()
    bench(config, tmp_path / "one", jobs=1, progress=False, report=False)

    def records(name: str) -> list[dict]:
        rows = [{k: v for k, v in r.items() if k != "timings" and not k.endswith("seconds")}
                for r in read_jsonl(tmp_path / name / "results.jsonl")]
        return sorted(rows, key=lambda r: (r["cell"], r["kind"], r.get("detector", ""), r.get("attack", "")))

    ray_records, one = records("ray"), records("one")
    assert {r["kind"] for r in one} >= {"attack", "detection", "defence"}
    assert len(one) > 0 and ray_records == one
