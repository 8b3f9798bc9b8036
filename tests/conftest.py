"""Every test on the same runtime, whatever ran before it; shared fixtures: small data in the real on-disk formats
the loaders read."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from infusion_audit.runtime import configure

# Set by pytest and by libraries for themselves, on import or start-up (scikit-learn, torchvision, Ray): which test
# happens to import them first must not decide which test fails.
LIBRARY_ENVIRONMENT = ("PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TORCHINDUCTOR_CACHE_DIR",
                       "PYTHONBREAKPOINT", "RAY_")


def pytest_configure(config):
    """The runtime the command line sets up (one torch and BLAS thread; deterministic kernels where there is CUDA),
    for the whole session: a test's numbers must not depend on which earlier test called `main`."""
    configure()


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(LIBRARY_ENVIRONMENT)}


def _set_environment(saved: dict) -> None:
    for key in set(_environment()) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def _logging_levels() -> dict:
    """The levels set on the root logger and the project's (libraries set their own on import)."""
    names = [""] + [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "infusion_audit"]
    levels = {name: logging.getLogger(name).level for name in names}
    return {name: level for name, level in levels.items() if level != logging.NOTSET} | {
        "disable": logging.root.manager.disable}


def _set_logging_levels(saved: dict) -> None:
    for name in _logging_levels().keys() - {"disable"}:
        logging.getLogger(name).setLevel(saved.get(name, logging.NOTSET))
    logging.disable(saved["disable"])


def _determinism() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())


def _set_determinism(saved: tuple) -> None:
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[2:6]
    torch.set_float32_matmul_precision(saved[6])


# What a test may not leave changed for the next one: name -> (read it, put back what was read).
PROCESS_STATE = {
    "torch and BLAS threads": (lambda: (torch.get_num_threads(), {p["num_threads"] for p in threadpool_info()}),
                               lambda saved: configure(saved[0])),
    "determinism flags": (_determinism, _set_determinism),
    "torch default dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "torch grad mode": (torch.is_grad_enabled, torch.set_grad_enabled),
    "working directory": (os.getcwd, os.chdir),
    "environment variables": (_environment, _set_environment),
    "logging levels": (_logging_levels, _set_logging_levels),
}


@pytest.fixture(autouse=True)
def same_start_every_time():
    """Each test starts from the same seeds of torch's, numpy's and Python's global generators; process-wide state
    it leaves changed (after its own fixtures' teardown) is put back and fails the test by name: use monkeypatch."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = {name: read() for name, (read, _) in PROCESS_STATE.items()}
    yield
    after = {name: read() for name, (read, _) in PROCESS_STATE.items()}
    leaked = [name for name in PROCESS_STATE if after[name] != before[name]]
    for name in leaked:
        PROCESS_STATE[name][1](before[name])
    if leaked:
        pytest.fail("the test left process-wide state changed (now restored): " + "; ".join(
            f"{name}: {_changed(before[name], after[name])}" for name in leaked))


def _changed(before, after) -> str:
    if isinstance(before, dict):
        return ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys(), key=str)
                         if before.get(k) != after.get(k))
    return f"{before!r} -> {after!r}"


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
