"""The executors behind the bench's grid (in-process, local process pool, Ray) and the seeding that makes
them give the same numbers: one setup per worker, results in completion order, errors as themselves."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from infusion_audit.errors import UserError
from infusion_audit.executors import (LocalExecutor, RayExecutor, SerialExecutor, make_executor)


# --------------------------------------------------------------------------- a toy grid
def toy_setup(directory: str, offset: int, fail: bool = False) -> dict:
    """A worker's state; each call appends a line to a file named by the process, so setups can be counted."""
    if fail:
        raise UserError("toy setup refused its config")
    with open(Path(directory) / f"setup-{os.getpid()}", "a") as fh:
        fh.write("setup\n")
    return {"directory": Path(directory), "offset": offset, "pid": os.getpid()}


def toy_work(state: dict, item: tuple[str, int]) -> tuple[int, int]:
    kind, n = item
    if kind == "fail":
        raise ValueError(f"toy item {n} failed")
    went = state["directory"] / "went"
    if kind == "go":
        went.touch()
    if kind == "wait":  # finishes only once another worker has run a "go" item
        deadline = time.monotonic() + 60
        while not went.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no other worker ran the 'go' item")
            time.sleep(0.01)
    return n * n + state["offset"], state["pid"]


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance with 2 CPUs, as CI starts it; skipped where Ray is not installed."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test file
    started = not ray.is_initialized()
    if started:
        # Ray puts the driver's working directory first on its workers' sys.path: the repo root would
        # shadow the installed package (as for the CLI subprocesses), so the instance starts elsewhere
        cwd = os.getcwd()
        os.chdir(tmp_path_factory.mktemp("ray"))
        try:
            ray.init(num_cpus=2, include_dashboard=False)
        finally:
            os.chdir(cwd)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(params=["serial", "local", "ray"])
def executor(request):
    if request.param == "ray":
        request.getfixturevalue("ray_instance")
        return RayExecutor(workers=2)
    return SerialExecutor() if request.param == "serial" else LocalExecutor(2)


@pytest.fixture(params=["local", "ray"])
def parallel_executor(request):
    if request.param == "ray":
        request.getfixturevalue("ray_instance")
        return RayExecutor(workers=2)
    return LocalExecutor(2)


def setups_by_process(directory: Path) -> dict[int, int]:
    return {int(p.name.split("-")[1]): len(p.read_text().splitlines()) for p in directory.glob("setup-*")}


def test_every_item_once_with_one_setup_per_worker(executor, tmp_path):
    items = [("square", n) for n in range(8)]
    results = list(executor.map_unordered(toy_setup, (str(tmp_path), 3), toy_work, items))
    assert sorted(item for item, _ in results) == items
    assert all(value == item[1] ** 2 + 3 for item, (value, _) in results)
    workers = {pid for _, (_, pid) in results}
    assert setups_by_process(tmp_path) == {pid: 1 for pid in workers}
    if isinstance(executor, SerialExecutor):
        assert workers == {os.getpid()} and [item for item, _ in results] == items
    else:
        assert 1 <= len(workers) <= 2 and os.getpid() not in workers


def test_results_come_back_in_completion_order(parallel_executor, tmp_path):
    """The first item cannot finish before the second has run in the other worker."""
    items = [("wait", 1), ("go", 2)]
    done = [item for item, _ in parallel_executor.map_unordered(toy_setup, (str(tmp_path), 0), toy_work, items)]
    assert done == [("go", 2), ("wait", 1)]


def test_an_error_in_work_arrives_as_itself(executor, tmp_path):
    items = [("square", 1), ("fail", 2), ("square", 3)]
    with pytest.raises(ValueError, match="toy item 2 failed"):
        list(executor.map_unordered(toy_setup, (str(tmp_path), 0), toy_work, items))


def test_an_error_in_setup_arrives_as_itself(executor, tmp_path):
    with pytest.raises(UserError, match="toy setup refused its config"):
        list(executor.map_unordered(toy_setup, (str(tmp_path), 0, True), toy_work, [("square", 1)]))


def toy_runtime(state: dict, item: tuple[str, int]) -> tuple[int, set[int], str]:
    from threadpoolctl import threadpool_info

    return torch.get_num_threads(), {p["num_threads"] for p in threadpool_info()}, os.environ["OMP_NUM_THREADS"]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_worker_computes_with_the_threads_it_is_given(kind, request, tmp_path):
    """Each worker configures its own process (runtime.configure) before its setup: torch, the BLAS/OpenMP pools and
    the variables pools loaded later read, whatever the driver runs with."""
    if kind == "ray":
        request.getfixturevalue("ray_instance")
    executor = LocalExecutor(1, threads=2) if kind == "local" else RayExecutor(workers=1, threads=2)
    ((_, result),) = executor.map_unordered(toy_setup, (str(tmp_path), 0), toy_runtime, [("threads", 0)])
    assert result == (2, {2}, "2") and torch.get_num_threads() == 1


def test_nothing_to_run_starts_no_worker(executor, tmp_path):
    assert list(executor.map_unordered(toy_setup, (str(tmp_path), 0), toy_work, [])) == []
    assert setups_by_process(tmp_path) == {}


def test_make_executor():
    assert isinstance(make_executor("local", 1), SerialExecutor)
    local = make_executor("local", 3, threads=2)
    assert isinstance(local, LocalExecutor) and (local.workers, local.threads) == (3, 2)
    ray = make_executor("ray", None, threads=2, address="ray://head:10001", gpus_per_worker=1)
    assert isinstance(ray, RayExecutor) and ray.address == "ray://head:10001"
    assert (ray.workers, ray.cpus_per_worker, ray.gpus_per_worker) == (None, 2.0, 1.0)  # a worker's CPUs: its threads
    for args, message in [(("dask",), "unknown executor 'dask'"), (("local", 2, 1, "head:6379"), "--executor ray"),
                          (("local", 0), "workers must be >= 1")]:
        with pytest.raises(UserError, match=message):
            make_executor(*args)


def test_ray_missing_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'infusion-audit\[ray\]'") as info:
        list(RayExecutor().map_unordered(toy_setup, (str(tmp_path), 0), toy_work, [("square", 1)]))
    assert "\n" not in str(info.value)


def test_a_worker_needing_more_than_the_cluster_has_is_refused(ray_instance, tmp_path):
    """Ray would wait forever for a GPU the cluster does not have."""
    with pytest.raises(UserError, match="needs 1 CPUs and 1 GPUs, the cluster has 2 CPUs and 0 GPUs"):
        list(RayExecutor(gpus_per_worker=1).map_unordered(toy_setup, (str(tmp_path), 0), toy_work, [("square", 1)]))


# --------------------------------------------------------------------------- seeding
def test_ekfac_fit_does_not_depend_on_the_global_rng():
    """kronfluence samples the Fisher's labels from the model's prediction. They come from the solver's own
    seeded generator, so a worker that has used the global RNG differently (a fresh process, a Ray actor,
    the driver after other cells) fits the same factors and solves to the same vector."""
    from infusion_audit.data import digits
    from infusion_audit.influence import make_ihvp, num_trainable
    from infusion_audit.models import DigitsCNN

    train = digits().train.subset(np.arange(96))
    torch.manual_seed(0)
    model = DigitsCNN()
    v = torch.randn(num_trainable(model), generator=torch.Generator().manual_seed(5))

    def fit(global_seed: int, draws: int, seed: int = 0):
        torch.manual_seed(global_seed)
        torch.rand(draws)
        solver = make_ihvp("ekfac", model, train, 1e-3, batch_size=32, seed=seed)
        return [b.lambdas for b in solver.blocks], solver.solve(v)

    lambdas, x = fit(1, 10)
    again, x_again = fit(2, 100_000)
    assert all(torch.equal(a, b) for a, b in zip(lambdas, again, strict=True)) and torch.equal(x, x_again)
    other, _ = fit(1, 10, seed=1)  # the labels are sampled: the solver's seed does change the factors
    assert not all(torch.equal(a, b) for a, b in zip(lambdas, other, strict=True))


SMALL_GRID = """
pipeline:
  dataset: {name: digits}
attack:
  attacks: [{name: infusion}, {name: probe-insertion, params: {copies: 1}}]
  targets: {n: 2, seed: 0}
budgets: [{k: 0.01, eps: 0.0625}]
scan: {detectors: [{name: loss-outlier}, {name: influence-outlier}], bootstrap: 20}
"""


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "timings" and not k.endswith("seconds")}


def differences(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> list[str]:
    """Where two runs' records (by cell) differ, field by field: a short failure message, where pytest's own
    diff of the whole structures would take minutes to compute."""
    out = []
    for cell in sorted(a.keys() | b.keys()):
        rows_a, rows_b = a.get(cell, []), b.get(cell, [])
        if len(rows_a) != len(rows_b):
            out.append(f"{cell}: {len(rows_a)} records, then {len(rows_b)}")
            continue
        for ra, rb in zip(rows_a, rows_b):
            out += [f"{cell} {ra.get('kind')} {ra.get('detector', '')}: {field} {ra.get(field)!r:.60} != "
                    f"{rb.get(field)!r:.60}" for field in sorted(ra.keys() | rb.keys()) if ra.get(field) != rb.get(field)]
    return out


@pytest.mark.slow
def test_bench_cells_are_identical_in_every_executor(ray_instance, tmp_path):
    """A small grid's records (attack on the victim, detection with EK-FAC influence, defence retrains) from
    the driver's process, a 2-process pool and 2 Ray actors: equal to the last bit, timings aside."""
    import yaml

    from infusion_audit.config import load_config, with_defaults
    from infusion_audit.grid import Grid

    config = with_defaults(load_config(yaml.safe_load(SMALL_GRID)))
    records = {}
    for name, executor in [("serial", SerialExecutor()), ("local", LocalExecutor(2, 1)),
                           ("ray", RayExecutor(workers=2, threads=1))]:  # one thread each, as the session's driver
        run_dir = tmp_path / name  # each its own: no influence factors or checkpoints reused from another
        cells = [cell for unit in Grid(config, run_dir, progress=False).units() for cell in unit]  # trains
        done = executor.map_unordered(Grid, (config, str(run_dir), False), Grid.run_cell, cells)
        records[name] = {cell.key: [without_timings(r.to_dict()) for r in rows] for cell, rows in done}
    assert len(records["serial"]) == 4
    assert {r["kind"] for rows in records["serial"].values() for r in rows} == {"attack", "detection", "defence"}
    assert differences(records["serial"], records["local"]) == []
    assert differences(records["serial"], records["ray"]) == []


@pytest.mark.slow
def test_bench_ray_equals_local(ray_instance, tmp_path):
    import yaml

    from infusion_audit import bench
    from infusion_audit.io import read_jsonl

    config = yaml.safe_load(SMALL_GRID)
    for name in ("local", "ray"):
        bench(config, tmp_path / name, jobs=2, executor=name, progress=False, report=False)
    local, ray = ([without_timings(r) for r in read_jsonl(tmp_path / name / "results.jsonl")]
                  for name in ("local", "ray"))
    by_cell = [{cell: [r for r in records if r["cell"] == cell] for cell in {r["cell"] for r in records}}
               for records in (local, ray)]
    assert len(local) > 0 and differences(*by_cell) == []
