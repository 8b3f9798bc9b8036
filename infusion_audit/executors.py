"""Where the grid runs: in this process, in a local process pool or on a Ray cluster, behind one interface.

A worker builds its state once with ``setup(*setup_args)`` (for the bench a Grid, which trains or
loads the shared checkpoints: far too costly to repeat per item) and then runs ``work(state, item)`` for
each item it is handed. Results come back to the caller in completion order, so the caller (the driver)
is the only process that writes records. Workers read and write the run directory themselves
(checkpoints, the influence-factor cache, under file locks): on a Ray cluster of several machines it
must be on a filesystem every node mounts at the same path.

A Ray worker that dies (its process killed, its node lost) is restarted by Ray and the item it was running
handed to it again (the actor's `max_restarts`, its tasks' `max_task_retries`): the item's result still comes
back once, so the driver records it once. An exception raised by the work itself is not retried.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .errors import UserError, first_line
from .runtime import DEFAULT_THREADS, configure

Item = TypeVar("Item")
Setup = Callable[..., Any]
Work = Callable[[Any, Any], Any]

EXECUTORS = ("local", "ray")
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))  # local processes: this machine's cores, up to 4
RAY_MISSING = "the ray executor needs Ray: pip install 'infusion-audit[ray]'"
RAY_RETRIES = 3  # a Ray worker lost mid-item: restarts of the actor, and tries of the item it was running


class Executor:
    """Runs ``work(state, item)`` for every item, ``state = setup(*setup_args)`` built once per worker.

    ``setup`` and ``work`` must be importable module-level functions (they are pickled by reference)."""

    def map_unordered(self, setup: Setup, setup_args: tuple, work: Work,
                      items: Iterable[Item]) -> Iterator[tuple[Item, Any]]:
        """Yield ``(item, result)`` as items finish. An exception raised by setup or work is re-raised here
        as itself, and the items not yet started are cancelled."""
        raise NotImplementedError


class SerialExecutor(Executor):
    """Everything in this process, in order: the reference the others match, and the easiest to debug."""

    def map_unordered(self, setup, setup_args, work, items):
        items = list(items)
        if items:
            state = setup(*setup_args)
            for item in items:
                yield item, work(state, item)


class LocalExecutor(Executor):
    """A pool of ``workers`` processes on this machine, each computing with ``threads`` torch threads."""

    def __init__(self, workers: int = DEFAULT_WORKERS, threads: int = DEFAULT_THREADS):
        if int(workers) < 1:
            raise UserError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads = int(workers), int(threads)

    def map_unordered(self, setup, setup_args, work, items):
        import multiprocessing

        items = list(items)
        if not items:
            return
        context = multiprocessing.get_context("spawn")  # a forked child would inherit torch's thread pools
        with futures.ProcessPoolExecutor(min(self.workers, len(items)), mp_context=context,
                                         initializer=_start_local_worker,
                                         initargs=(setup, setup_args, self.threads, os.getpid())) as pool:
            pending = {pool.submit(_run_local, work, item): item for item in items}
            try:
                for future in futures.as_completed(pending):
                    yield pending[future], future.result()
            except BaseException:  # an error, Ctrl-C or the caller stopping: start nothing more
                for future in pending:
                    future.cancel()
                raise


class RayExecutor(Executor):
    """One Ray actor per worker, holding its state; each item goes to the next free actor.

    Connects to the cluster at ``address`` (or ``RAY_ADDRESS``, or starts a local instance) unless Ray is
    already initialised in this process. Each actor declares ``cpus_per_worker`` (default: ``threads``)
    and ``gpus_per_worker`` to Ray's scheduler; ``workers`` (default: as many as the cluster holds) caps
    how many run at once. Actors work in the driver's working directory, so relative paths in a config
    mean the same on every node."""

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int = DEFAULT_THREADS,
                 cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0):
        if workers is not None and int(workers) < 1:
            raise UserError(f"workers must be >= 1, got {workers}")
        self.address, self.workers, self.threads = address, workers, int(threads)
        self.cpus_per_worker = float(self.threads if cpus_per_worker is None else cpus_per_worker)
        self.gpus_per_worker = float(gpus_per_worker)

    def map_unordered(self, setup, setup_args, work, items):
        items = list(items)
        if not items:
            return
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"ray: cannot start or reach a cluster at {self.address or 'a local instance'}: "
                                f"{first_line(exc)}") from None
        try:
            yield from self._run(ray, setup, setup_args, work, items)
        finally:
            if started:
                ray.shutdown()

    def capacity(self, ray) -> int:
        """How many workers the cluster holds at once, by the CPUs and GPUs each declares."""
        total = ray.cluster_resources()
        fits = [total.get("CPU", 0.0) / self.cpus_per_worker] if self.cpus_per_worker > 0 else []
        if self.gpus_per_worker > 0:
            fits.append(total.get("GPU", 0.0) / self.gpus_per_worker)
        n = int(min(fits)) if fits else 1
        if n < 1:
            raise UserError(f"ray: a worker needs {self.cpus_per_worker:g} CPUs and {self.gpus_per_worker:g} GPUs, "
                            f"the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")
        return n

    def _run(self, ray, setup, setup_args, work, items):
        actor = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=RAY_RETRIES,
                           max_task_retries=RAY_RETRIES)(_Worker)
        fits = self.capacity(ray)  # checked even with `workers` given: a worker the cluster cannot hold waits forever
        n = min(len(items), fits if self.workers is None else int(self.workers))
        actors = [actor.remote(setup, setup_args, self.threads, os.getcwd()) for _ in range(n)]
        queue, running = items[::-1], {}

        def submit(worker) -> None:
            if queue:
                item = queue.pop()
                running[worker.run.remote(work, item)] = (worker, item)

        try:
            for worker in actors:
                submit(worker)
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                worker, item = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the worker's own exception, not Ray's wrapper
                    raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from exc
                except ray.exceptions.RayActorError as exc:  # lost more often than Ray would restart it
                    raise UserError(f"ray: a worker was lost beyond Ray's {RAY_RETRIES} restarts and retries "
                                    f"({first_line(exc)}); what finished is kept, re-run to resume") from None
                submit(worker)
                yield item, result
        finally:  # an error, Ctrl-C or the caller stopping: stop every worker and what it was running
            for worker in actors:
                ray.kill(worker)


def make_executor(name: str = "local", workers: int | None = None, threads: int = DEFAULT_THREADS,
                  address: str | None = None, gpus_per_worker: float = 0.0) -> Executor:
    """The executor the CLI's ``--executor``/``--jobs``/``--threads``/``--address`` describe. ``local`` with
    one worker runs in this process; ``workers=None`` means this machine's cores up to 4 (local) or as many
    as the cluster holds (ray)."""
    if name not in EXECUTORS:
        raise UserError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
    if name == "ray":
        return RayExecutor(address, workers, threads, gpus_per_worker=gpus_per_worker)
    if address is not None:
        raise UserError("an address is for the ray executor (--executor ray)")
    workers = DEFAULT_WORKERS if workers is None else workers
    return SerialExecutor() if workers == 1 else LocalExecutor(workers, threads)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


# --------------------------------------------------------------------------- inside a worker
class _Worker:
    """A worker's state, built on its first item so that a failing setup reaches the driver as its own
    exception (the pool's initializer would only report a broken pool). Ray runs it as an actor."""

    def __init__(self, setup: Setup, setup_args: tuple, threads: int, cwd: str | None = None):
        self.setup, self.setup_args, self.threads, self.cwd = setup, setup_args, threads, cwd
        self.state, self.ready = None, False

    def run(self, work: Work, item: Any) -> Any:
        if not self.ready:
            if self.cwd is not None:
                _enter(self.cwd)
            configure(self.threads)
            self.state, self.ready = self.setup(*self.setup_args), True
        return work(self.state, item)


def _enter(directory: str) -> None:
    try:
        os.chdir(directory)
    except OSError:
        raise UserError(f"ray worker on {socket.gethostname()}: no directory {directory} (the driver's working "
                        "directory); put the run directory and data on a filesystem every node mounts at the "
                        "same path") from None


_LOCAL: _Worker | None = None


def _start_local_worker(setup: Setup, setup_args: tuple, threads: int, driver: int) -> None:
    global _LOCAL
    _LOCAL = _Worker(setup, setup_args, threads)
    threading.Thread(target=_exit_without, args=(driver,), daemon=True, name="driver-watch").start()


def _exit_without(driver: int, every: float = 0.5) -> None:
    """Exit as soon as the driver is gone. A driver killed outright (SIGKILL, an OOM kill, a SIGTERM from a CI
    runner) cannot stop its pool, and its workers would compute cells nobody records for minutes, holding
    the cores a resumed run needs; a worker whose driver died is handed to another parent."""
    while os.getppid() == driver:
        time.sleep(every)
    os._exit(1)


def _run_local(work: Work, item: Any) -> Any:
    assert _LOCAL is not None, "called outside a LocalExecutor worker"
    return _LOCAL.run(work, item)
