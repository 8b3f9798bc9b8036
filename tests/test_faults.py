"""Faults that lose nothing, on small real benches: a plugin that raises in one cell (recorded, reported, the
other cells complete, the policy fails), a full filesystem while a record or an artefact is written (one line,
results.jsonl whole, a resume completes), and a Ray worker killed mid-cell (the bench completes with every cell
once, its records those of an undisturbed run)."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from infusion_audit import bench
from infusion_audit.cli import main
from infusion_audit.cli.bench import POLICY_FAILED
from infusion_audit.config import load_config, with_defaults
from infusion_audit.io import read_jsonl
from infusion_audit.pipeline import Pipeline

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def small(attack: dict, detectors: list[dict], n: int = 3, **attack_section) -> dict:
    """A bench of seconds: digits trained for 3 epochs, one label-flip arm (random documents: no influence to fit)
    on `n` targets, the detectors given, no defence."""
    return {"pipeline": {"dataset": {"name": "digits"}, "train": {"epochs": 3}, "quality_floor": 0.0},
            "attack": {"attacks": [attack], "targets": {"n": n, "seed": 0}, **attack_section},
            "scan": {"detectors": detectors, "bootstrap": 0}, "defence": {"enabled": False}}


def targets(config: dict) -> list[int]:
    """The test indices of a config's targets, as the bench draws them (no training)."""
    full = with_defaults(load_config(config))
    t = full.attack.targets
    return [target.index for target in Pipeline.from_config(full.pipeline).targets(t.n, t.rule, t.seed)]


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("timings", "artefact") and not k.endswith("seconds")}


def by_cell(run_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in read_jsonl(run_dir / "results.jsonl"):
        out.setdefault(r["cell"], []).append(without_timings(r))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- a plugin that raises
def test_a_raising_plugin_costs_its_cell_only(tmp_path, capsys):
    config = small({"name": "fault_plugins:FailingLabelFlip", "params": {"selection": "random"}},
                   [{"name": "loss-outlier"}, {"name": "fault_plugins:FailingLossOutlier"}])
    bad_attack, bad_detector, good = targets(config)
    config["attack"]["attacks"][0]["params"]["fail_on"] = bad_attack
    config["scan"]["detectors"][1]["params"] = {"fail_on": bad_detector}
    result = bench(config, tmp_path / "run", progress=False)

    records = result.records
    assert sorted(r["target"]["index"] for r in records["attack"]) == sorted([bad_detector, good])  # the others ran
    errors = {(e["stage"], e["target"]["index"]): e for e in records["error"]}
    assert set(errors) == {("attack", bad_attack), ("detector", bad_detector)}
    assert errors[("attack", bad_attack)]["message"] == f"cannot poison test document {bad_attack}"
    assert errors[("attack", bad_attack)]["error"] == "RuntimeError"
    assert errors[("attack", bad_attack)]["where"].startswith(str(TESTS / "fault_plugins.py"))
    detector = errors[("detector", bad_detector)]
    assert detector["detector"] == f"fault_plugins:FailingLossOutlier(fail_on={bad_detector})"
    assert detector["message"] == f"no scores for the set poisoned against document {bad_detector}"
    detections = [(r["detector"], r["target"]["index"]) for r in records["detection"]]
    assert sorted(detections) == sorted([("loss-outlier", bad_detector), ("loss-outlier", good),
                                         (detector["detector"], good)])
    assert not records["skip"]  # a detector that raised is an error, not a skip
    # reported: in the report, and the policy treats the errors as a failure
    html = result.report.read_text(encoding="utf-8")
    assert 'id="errors"' in html and f"cannot poison test document {bad_attack}" in html
    assert "2 plugin errors" in html
    assert result.verdict["policy"]["passed"] is False
    assert [f["rule"] for f in result.verdict["policy"]["failures"]] == ["errors"]

    # the command: the attack's cell is tried again (it raises again), the rest resumes; exit code and one line
    capsys.readouterr()
    assert main(["--quiet", "bench", str(tmp_path / "run" / "config.yaml"), "--out", str(tmp_path / "run")]) \
        == POLICY_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("infusion-audit:")]
    assert err == [f"infusion-audit: policy failed: errors: 2 plugin errors in this run: "
                   f"{errors[('attack', bad_attack)]['attack']}, k=0.01, target #{bad_attack}, attack raised "
                   f"RuntimeError: cannot poison test document {bad_attack} (and 1 more; see the report)"]
    assert len(read_jsonl(tmp_path / "run" / "results.jsonl")) == len(sum(result.records.values(), [])) + 1
    assert main(["--quiet", "bench", str(tmp_path / "run" / "config.yaml"), "--out", str(tmp_path / "run"),
                 "--fail-on", "allow_errors=true"]) == 0


# --------------------------------------------------------------------------- a full disk
DISK_DETECTORS = [{"name": "loss-outlier"}, {"name": "spectral-signature"}, {"name": "knn-label"},
                  {"name": "perturbation-norm"}]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The undisturbed run the full-disk runs must end up equal to (artefacts written)."""
    run_dir = tmp_path_factory.mktemp("disk-reference") / "run"
    bench(small({"name": "label-flip", "params": {"selection": "random"}}, DISK_DETECTORS), run_dir, progress=False,
          report=False)
    return run_dir


SIMULATE = "INFUSION_AUDIT_TEST_SIMULATED_DISK"  # set: the simulated full disk runs even where a tmpfs mounts


@functools.cache
def tmpfs_refused() -> str | None:
    """Why no tmpfs can be mounted here (None: one can; it needs root and CAP_SYS_ADMIN)."""
    with tempfile.TemporaryDirectory() as where:
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where], capture_output=True,
                                  text=True)
        except OSError as exc:
            return str(exc)
        if done.returncode != 0:
            return done.stderr.strip() or f"mount exited with {done.returncode}"
        subprocess.run(["umount", where], check=True)
    return None


class Tmpfs:
    """A 32 MiB tmpfs of its own, filled by a ballast file until one page is free: the run rewrites its config.yaml
    (an atomic write borrows a page), then nothing more fits."""

    def __init__(self, root: Path):
        self.root, self.page = root, os.statvfs(root).f_frsize
        self.ballast = root / "ballast"

    def fill(self) -> None:
        stats = os.statvfs(self.root)
        with open(self.ballast, "wb") as fh:
            fh.write(b"\0" * (stats.f_bavail * stats.f_frsize - self.page))

    def free(self) -> None:
        self.ballast.unlink()


class SimulatedFullDisk:
    """Where no tmpfs can be mounted: the run directory on the ordinary disk, its writes failing as a full disk's
    once filled, through the same code: an append to results.jsonl writes the 1,000 bytes that fit, then fails with
    ENOSPC; the fsync of a poisoned set's file fails with ENOSPC (as a network filesystem reports a full disk)."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.patch = root, monkeypatch
        root.mkdir()

    def fill(self) -> None:
        write, fsync, room = os.write, os.fsync, [1000]

        def full() -> OSError:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def limited_write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
                if not room[0]:
                    raise full()
                data = bytes(data[:room[0]])
                room[0] -= len(data)
            return write(fd, data)

        def failing_fsync(fd):
            if "/artefacts/poisoned/" in os.readlink(f"/proc/self/fd/{fd}"):
                raise full()
            return fsync(fd)

        self.patch.setattr(os, "write", limited_write)
        self.patch.setattr(os, "fsync", failing_fsync)

    def free(self) -> None:
        self.patch.undo()


@pytest.fixture(params=["tmpfs", "simulated"])
def disk(request, tmp_path, monkeypatch):
    refused = tmpfs_refused()
    if request.param == "simulated":
        if refused is None and not os.environ.get(SIMULATE):
            pytest.skip("a tmpfs can be mounted here: the full disk is a real one (the simulated one runs without)")
        yield SimulatedFullDisk(tmp_path / "disk", monkeypatch)
        return
    if refused is not None:
        pytest.skip(f"cannot mount a tmpfs here ({refused}): a real full disk needs root and CAP_SYS_ADMIN; "
                    "the simulated full disk runs instead")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    yield Tmpfs(mount)
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("what", ["record", "artefact"])
def test_a_full_disk_stops_the_run_and_a_resume_completes(reference_run, disk, what, capsys):
    """The first cell is done; the disk fills while the next cell's records (no artefacts written) or its
    poisoned set is written. The run stops with one line, exit code 2; results.jsonl holds whole cells only;
    with space freed, the same command completes, its records those of an undisturbed run."""
    run_dir = disk.root / "run"
    shutil.copytree(reference_run, run_dir)
    reference = by_cell(reference_run)
    first = next(iter(reference))
    lines = [r for r in read_jsonl(reference_run / "results.jsonl") if r["cell"] == first]
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    shutil.rmtree(run_dir / "artefacts" / "poisoned")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["attack"]["write_artefacts"] = what == "artefact"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    size = (run_dir / "results.jsonl").stat().st_size
    block = len("".join(json.dumps(r) + "\n" for r in read_jsonl(reference_run / "results.jsonl")
                        if r["cell"] == list(reference)[1]))
    if isinstance(disk, Tmpfs) and what == "record":  # the append starts in the last page's slack, fails part-way
        assert 0 < -size % disk.page < block - disk.page
    disk.fill()

    command = ["--quiet", "bench", str(run_dir / "config.yaml"), "--out", str(run_dir), "--jobs", "1", "--no-report"]
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infusion-audit: error: No space left on device writing ")
    assert err[0].endswith("the finished results are kept: free some space and re-run the same command to resume")
    assert ("results.jsonl" in err[0]) == (what == "record") and ("poisoned" in err[0]) == (what == "artefact")
    text = (run_dir / "results.jsonl").read_text()
    assert text.endswith("\n") and len(text) == size  # every line whole: the failed append was cut back
    assert {json.loads(line)["cell"] for line in text.splitlines()} == {first}

    disk.free()
    assert main(command) == 0
    assert by_cell(run_dir) == reference


# --------------------------------------------------------------------------- a Ray worker killed mid-cell
@pytest.mark.slow
def test_a_ray_worker_killed_mid_cell_loses_nothing(tmp_path):
    """Two Ray workers; the first cell's worker is sent SIGKILL while it crafts. Ray restarts the worker and runs
    the cell again in the new process; the driver records every cell once, and the records equal an undisturbed
    run's, timings aside."""
    pytest.importorskip("ray")
    config = small({"name": "fault_plugins:HeldLabelFlip", "params": {"selection": "random"}},
                   [{"name": "loss-outlier"}], n=4)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    bench(tmp_path / "bench.yaml", tmp_path / "undisturbed", progress=False, report=False)

    hold = tmp_path / "hold"
    hold.mkdir()
    env = {**os.environ, "PYTHONPATH": str(TESTS), "INFUSION_AUDIT_TEST_HOLD": str(hold), "RAY_DEDUP_LOGS": "0"}
    cwd = tmp_path / "driver"  # not the checkout: Ray puts the driver's directory first on its workers' path
    cwd.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "infusion_audit", "--quiet", "bench", str(tmp_path / "bench.yaml"),
                                "--out", str(tmp_path / "killed"), "--executor", "ray", "--jobs", "2", "--no-report"],
                               cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (hold / "held").exists() or not (hold / "held").read_text():
            assert process.poll() is None and time.monotonic() < deadline, "no worker reached the held craft"
            time.sleep(0.2)
        killed = int((hold / "held").read_text())
        os.kill(killed, signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    crafted = {tuple(map(int, p.name.split("-")[1:])) for p in hold.glob("crafted-*")}
    assert len({index for index, _ in crafted}) == 4 and killed not in {pid for _, pid in crafted}
    disturbed = by_cell(tmp_path / "killed")
    attack_cells = [r["cell"] for rows in disturbed.values() for r in rows if r["kind"] == "attack"]
    assert len(attack_cells) == len(set(attack_cells)) == 4  # every cell once
    assert disturbed == by_cell(tmp_path / "undisturbed")
