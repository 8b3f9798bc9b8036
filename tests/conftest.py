"""Shared fixtures: small data in the real on-disk formats the loaders read."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """A tiny dataset in CIFAR-10's own on-disk format (cifar-10-batches-py, pickled batches).

    torchvision verifies the official MD5 of every batch before unpickling it; the fixture's files
    are ours, so their checksums are swapped in for this test only.
    """
    from torchvision.datasets import CIFAR10

    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    checksums = {}
    for i, name in enumerate(names):
        labels = [int(v) for v in rng.integers(0, 10, size=12)]
        batch = {"batch_label": name, "labels": labels,
                 "data": rng.integers(0, 256, size=(12, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{j}.png" for j in range(12)]}
        (base / name).write_bytes(pickle.dumps(batch))
        checksums[name] = hashlib.md5((base / name).read_bytes()).hexdigest()
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                             "ship", "truck"], "num_cases_per_batch": 12, "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))
    monkeypatch.setattr(CIFAR10, "train_list", [[n, checksums[n]] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", checksums["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": hashlib.md5((base / "batches.meta").read_bytes()).hexdigest()})
    return tmp_path / "cifar10"


SMALL_BENCH = """
pipeline:
  dataset: {name: digits}
attack:
  attacks:
    - {name: infusion}
    - {name: probe-insertion, params: {copies: 1}}
    - {name: label-flip}
  targets: {n: 2, seed: 0}
budgets:
  - {k: 0.01, eps: 0.0625}
scan: {bootstrap: 50}
"""


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    """A real, small attack-then-defend run (2 targets x 3 attacks, every detector, the defence)."""
    from infusion_audit import bench

    root = tmp_path_factory.mktemp("small-bench")
    (root / "bench.yaml").write_text(SMALL_BENCH)
    result = bench(root / "bench.yaml", root / "run", progress=False)
    return root / "run", result.report


@pytest.fixture(scope="session")
def context(tmp_path_factory):
    """The default digits pipeline, trained, as an attacker sees it (shared by the attack tests)."""
    from infusion_audit.attacks import AttackContext
    from infusion_audit.config import PipelineConfig
    from infusion_audit.pipeline import Pipeline, train_pipeline

    pipeline = Pipeline.from_config(PipelineConfig())
    trained = train_pipeline(pipeline, tmp_path_factory.mktemp("train"), progress=False)
    return AttackContext(pipeline, trained, cache_dir=tmp_path_factory.mktemp("cache"))
