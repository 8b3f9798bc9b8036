"""Hardening: loaders refuse hostile files by their headers, scan writes its page, one process per run
directory, damaged caches are recomputed rather than used, and a SIGKILLed bench resumes cleanly."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infusion_audit.cli import main
from infusion_audit.config import PluginSpec, PipelineConfig, TrainConfig
from infusion_audit.data import digits, load_npz, load_png_folder, save_npz
from infusion_audit.errors import DataError, UserError
from infusion_audit.io import run_lock, verified


def _npz(path: Path, **members: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(header: dict, data: bytes = b"") -> bytes:
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


@pytest.fixture(scope="module")
def suspect(tmp_path_factory) -> Path:
    """200 digits, two of them pushed off the 1/16 storage grid (what perturbation-norm finds without a model)."""
    clean = digits().train.subset(np.arange(200))
    data = clean.with_documents([3, 7], clean.x[[3, 7]] + 0.01)
    return save_npz(tmp_path_factory.mktemp("hardening") / "suspect.npz", data)


# --------------------------------------------------------------------------- loaders
def test_npz_headers_are_checked_before_anything_is_allocated(tmp_path):
    y = _npy(np.arange(4) % 2)
    cases = {
        "oversized": (_npy_header({"descr": "<f4", "fortran_order": False, "shape": (10**12, 1, 8, 8)}),
                      "more than the limit"),
        "short": (_npy_header({"descr": "<f4", "fortran_order": False, "shape": (4, 1, 8, 8)}, bytes(100)),
                  "header declares shape (4, 1, 8, 8) of float32 (1,024 bytes) but the array holds 100 bytes"),
        "object": (_npy_header({"descr": "|O", "fortran_order": False, "shape": (4,)}, bytes(32)), "pickled objects"),
        "structured": (_npy_header({"descr": [("a", "<f4")], "fortran_order": False, "shape": (4,)}, bytes(16)),
                       "unsupported dtype"),
        "negative": (_npy_header({"descr": "<f4", "fortran_order": False, "shape": (-4, 1)}), "invalid shape"),
        "version": (b"\x93NUMPY\x03\x00" + _npy(np.zeros(4))[8:], "unsupported .npy format version 3.0"),
    }
    for case, (x, message) in cases.items():
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            load_npz(_npz(tmp_path / f"{case}.npz", **{"x.npy": x, "y.npy": y}))
        assert f"{case}.npz[x]" in str(info.value) and "\n" not in str(info.value)
    labels = _npy(np.arange(9))  # 9 labels for 4 images: refused from the headers alone
    with pytest.raises(DataError, match=r"labels must have shape \(4,\), got shape \(9,\)"):
        load_npz(_npz(tmp_path / "count.npz", **{"x.npy": _npy(np.zeros((4, 1, 2, 2), np.float32)), "y.npy": labels}))


def test_all_negative_labels_are_named_plainly(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 1, 2, 2), np.float32), y=-np.ones(3, int))
    with pytest.raises(DataError, match=r"found a negative label \(-1\)") as info:
        load_npz(tmp_path / "neg.npz")
    assert "0..-1" not in str(info.value)


def _png(path: Path, array: np.ndarray, fmt: str = "PNG") -> Path:
    Image.fromarray(array).save(path, fmt)
    return path


def test_png_folders_are_checked_by_their_headers(tmp_path):
    grey = np.zeros((8, 8), np.uint8)

    def folder(name: str, *files: tuple[str, np.ndarray, str]) -> Path:
        (tmp_path / name / "cat").mkdir(parents=True)
        for fname, array, fmt in files:
            _png(tmp_path / name / "cat" / fname, array, fmt)
        return tmp_path / name

    cases = {
        "a JPEG file named .png": folder("jpeg", ("a.png", grey, "PNG"), ("b.png", np.zeros((8, 8, 3), np.uint8),
                                                                          "JPEG")),
        "PNG mode 'I;16'; need 8-bit": folder("deep", ("a.png", grey.astype(np.uint16) + 1000, "PNG")),
        "differs from (1, 8, 8)": folder("sizes", ("a.png", grey, "PNG"), ("b.png", np.zeros((8, 9), np.uint8), "PNG")),
    }
    nested = folder("nested", ("a.png", grey, "PNG"))
    (nested / "cat" / "more").mkdir()
    cases["a folder inside class folder 'cat'"] = nested
    for message, path in cases.items():
        with pytest.raises(DataError, match=re.escape(message)):
            load_png_folder(path)
    ok = folder("ok", ("a.png", grey, "PNG"), ("b.png", grey + 255, "PNG"))
    (ok / "cat" / ".hidden").write_text("ignored")
    (ok / "cat" / "notes.txt").write_text("ignored")
    assert load_png_folder(ok).x.shape == (2, 1, 8, 8)


def test_behaviour_from_an_npz_that_holds_only_x(tmp_path, suspect):
    from infusion_audit.scan.inputs import parse_behaviour

    data = load_npz(suspect)
    np.savez(tmp_path / "probe.npz", x=(data.x[:5] * 255).round().astype(np.uint8))
    behaviour = parse_behaviour(f"{tmp_path / 'probe.npz'}:4:3", data)
    assert behaviour.cls == 3 and np.allclose(np.asarray(behaviour.x), data.x[4], atol=0.5 / 255)


# --------------------------------------------------------------------------- scan writes its page
def test_scan_writes_report_html_beside_scores(suspect, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["-q", "scan", str(suspect), "--detectors", "perturbation-norm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "scores.csv").exists() and (out / "report.html").exists()
    assert f"report: {out / 'report.html'}" in printed.splitlines()[-1]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "perturbation-norm" in html and "<table" in html
    quiet = tmp_path / "no-report"
    assert main(["-q", "scan", str(suspect), "--detectors", "perturbation-norm", "--out", str(quiet),
                 "--no-report"]) == 0
    assert (quiet / "scores.csv").exists() and not (quiet / "report.html").exists()
    assert "report:" not in capsys.readouterr().out


@pytest.mark.browser
def test_scan_report_renders_offline_in_chromium(suspect, tmp_path):
    from test_browser import Elements, load_in_chromium

    out = tmp_path / "scan"
    assert main(["-q", "scan", str(suspect), "--detectors", "perturbation-norm", "--out", str(out)]) == 0
    loaded = load_in_chromium(out / "report.html", tmp_path)
    assert loaded["requests"] == []
    dom = Elements()
    dom.feed(loaded["dom"])
    assert "verdict" in dom.ids and dom.tags.get("table", 0) >= 1 and "script" not in dom.tags
    table = loaded["dom"][loaded["dom"].index("<tbody>"):]
    first = [int(i) for i in re.findall(r"<tr[^>]*>\s*<td>(\d+)</td>", table)[:2]]
    assert sorted(first) == [3, 7]  # the two off-grid documents lead the ranking
    shot = Image.open(loaded["screenshot"]).convert("L").crop((0, 0, 1280, 600))
    assert shot.getextrema()[0] < 60 and len(shot.getcolors(1 << 16) or []) > 20  # text, not a blank page


# --------------------------------------------------------------------------- one process per run directory
HOLD_LOCK = "import sys, time\nfrom infusion_audit.io import run_lock\nwith run_lock(sys.argv[1]):\n" \
            "    print('locked', flush=True)\n    time.sleep(600)\n"


def test_a_second_process_on_a_locked_run_directory_is_refused(suspect, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        expected = (f"{out} is in use by another infusion-audit process (pid {holder.pid}); "
                    "wait for it or use another --out")
        for argv in (["scan", str(suspect), "--detectors", "perturbation-norm", "--out", str(out)],
                     ["bench", "--out", str(out), "--jobs", "1"]):
            assert main(["-q", *argv]) == 2
            assert capsys.readouterr().err.strip().splitlines() == [f"infusion-audit: error: {expected}"]
        assert not (out / "scores.csv").exists() and not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(out):  # the kernel released the dead holder's lock
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with run_lock(out):  # a second holder, even in the same process, is refused
                pass


# --------------------------------------------------------------------------- damaged caches
def _flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_a_damaged_checkpoint_is_retrained_not_loaded(tmp_path, caplog):
    from infusion_audit.pipeline import Pipeline, train_pipeline
    from infusion_audit.training import Checkpoint

    config = PipelineConfig(dataset=PluginSpec("digits"), model=PluginSpec("digits-cnn"),
                            train=TrainConfig(epochs=3, batch_size=64))
    pipeline = Pipeline.from_config(config)
    clean = train_pipeline(pipeline, tmp_path, progress=False)
    states = [Checkpoint.load(p).model for p in clean.checkpoints]
    damaged = clean.checkpoints[1]
    _flip_byte(damaged)
    with caplog.at_level(logging.WARNING, logger="infusion_audit"):
        again = train_pipeline(pipeline, tmp_path, progress=False)
    assert any(str(damaged) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert again.metrics["resumed_from_epoch"] == 0  # epochs 1.. were retrained from the intact epoch 0
    for path, state in zip(again.checkpoints, states):
        assert verified(path)
        assert all(torch.equal(state[k], v) for k, v in Checkpoint.load(path).model.items())
    caplog.clear()
    (again.checkpoints[-1].parent / "metrics.json.sha256").unlink()  # an unrecorded artefact is not trusted
    with caplog.at_level(logging.WARNING, logger="infusion_audit"):
        train_pipeline(pipeline, tmp_path, progress=False)
    assert any("metrics.json" in r.getMessage() and "no readable recorded hash" in r.getMessage()
               for r in caplog.records)


def test_truncated_ekfac_factors_are_refitted(tmp_path, caplog):
    from infusion_audit.influence import loss_gradient, make_ihvp
    from infusion_audit.models import DigitsCNN

    train = digits().train.subset(np.arange(96))
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    fitted = make_ihvp("ekfac", model, train, 1e-3, cache_dir=tmp_path, batch_size=32)
    g = loss_gradient(model, train.batch([5]))
    clean = fitted.solve(g)
    factor = tmp_path / fitted.analysis_name / "factors_factors" / "lambda_matrix.safetensors"
    factor.write_bytes(factor.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="infusion_audit"):
        refitted = make_ihvp("ekfac", model, train, 1e-3, cache_dir=tmp_path, batch_size=32)
    assert not refitted.info["cached"]
    assert any("factors_factors" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert torch.equal(refitted.solve(g), clean)
    assert make_ihvp("ekfac", model, train, 1e-3, cache_dir=tmp_path, batch_size=32).info["cached"]


def test_a_damaged_scan_model_is_retrained(tmp_path, caplog):
    from infusion_audit.scan.api import train_on_suspect

    data = digits().train.subset(np.arange(100))
    pipeline = PipelineConfig(model=PluginSpec("digits-cnn"), train=TrainConfig(epochs=1, batch_size=50))
    cache = tmp_path / "model.pt"
    model, info = train_on_suspect(data, pipeline, cache, progress=False)
    state = copy.deepcopy(model.state_dict())
    assert train_on_suspect(data, pipeline, cache, progress=False)[1]["reused"]
    _flip_byte(cache)
    with caplog.at_level(logging.WARNING, logger="infusion_audit"):
        again, info = train_on_suspect(data, pipeline, cache, progress=False)
    assert "reused" not in info and any(str(cache) in r.getMessage() for r in caplog.records)
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


# --------------------------------------------------------------------------- SIGKILL and resume
KILL_BENCH = """
pipeline:
  dataset: {name: digits}
  train: {epochs: 3}
attack:
  attacks:
    - {name: probe-insertion, params: {copies: 1}}
    - {name: label-flip}
  targets: {n: 2, seed: 0}
scan: {detectors: [{name: perturbation-norm}], bootstrap: 20}
defence: {enabled: false}
"""


@pytest.mark.slow
def test_a_sigkilled_bench_resumes_with_every_cell_once(tmp_path):
    """A real process killed with SIGKILL once its first cell is recorded (slow: two bench runs, ~25 s; the
    only way to test what a kill leaves behind), then resumed: every cell exactly once, every line JSON."""
    from infusion_audit import bench

    config, out = tmp_path / "bench.yaml", tmp_path / "run"
    config.write_text(KILL_BENCH)
    results = out / "results.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "infusion_audit", "-q", "bench", str(config), "--out", str(out),
                            "--jobs", "1", "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (results.exists() and b"\n" in results.read_bytes()):
        assert run.poll() is None, run.stderr.read().decode()
        assert time.monotonic() < deadline, "no record within 300 s"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL and not (out / "provenance.json").exists()  # killed mid-run
    before = [line for line in results.read_text().splitlines(keepends=True) if line.endswith("\n")]
    result = bench(config, out, jobs=1, progress=False, report=False)
    lines = results.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]  # nothing torn: every line is a whole JSON record
    assert lines[:len(before)] == before and len(lines) > len(before)  # finished cells kept, not redone
    cells = [r["cell"] for r in records if r["kind"] == "attack"]
    assert len(cells) == len(set(cells)) == 4
    detections = sorted((r["cell"], r["detector"]) for r in records if r["kind"] == "detection")
    assert detections == sorted((cell, "perturbation-norm") for cell in cells)
    assert (out / "provenance.json").exists() and result is not None



def _children(pid: int) -> dict[int, str]:
    """The live child processes of `pid` (Linux /proc): pid -> command line."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


LONG_CELLS = """
import os
import time
from pathlib import Path

from infusion_audit.executors import LocalExecutor


def setup():
    return None


def work(state, item):
    Path(f"started-{os.getpid()}").touch()
    time.sleep(120)  # a cell far longer than the test waits
    return item


if __name__ == "__main__":
    for _ in LocalExecutor(workers=2).map_unordered(setup, (), work, [1, 2]):
        pass
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_workers_exit_when_their_driver_is_killed(tmp_path):
    """A driver killed outright (SIGKILL: it cannot stop its pool) leaves no worker computing cells nobody will
    record: each notices its driver is gone and exits within seconds, mid-cell."""
    (tmp_path / "driver.py").write_text(LONG_CELLS)
    run = subprocess.Popen([sys.executable, "driver.py"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           cwd=tmp_path)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while len(workers := {int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")}) < 2:
            assert run.poll() is None, run.stderr.read().decode()
            assert time.monotonic() < deadline, "the workers did not start their cells within 240 s"
            time.sleep(0.05)
        assert workers <= set(_children(run.pid))  # the pool's own processes, in their cells
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "a worker outlived its killed driver by 10 s"
    finally:
        run.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
