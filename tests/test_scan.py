import csv
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from infusion_audit.cli import main
from infusion_audit.data import digits, save_npz, save_png_folder, write_poisoned

FAST = "loss-outlier,knn-label,spectral-signature,perturbation-norm"


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """500 digits with 10 labels flipped, written like an attack run writes them (npz + manifest), a clean copy,
    and 50 held-out test digits as one .npz."""
    root = tmp_path_factory.mktemp("scan")
    split = digits()
    clean = split.train.subset(np.arange(500))
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(500, 10, replace=False))
    poisoned = clean.with_documents(idx, clean.x[idx], (clean.y[idx] + rng.integers(1, 10, 10)) % 10)
    write_poisoned(root / "attack", clean, poisoned, idx, {"attack": "label-flip"})
    save_npz(root / "clean.npz", clean)
    save_npz(root / "test.npz", split.test.subset(np.arange(50)))
    return {"root": root, "data": root / "attack" / "poisoned.npz", "manifest": root / "attack" / "manifest.json",
            "reference": root / "clean.npz", "test": root / "test.npz", "poisoned": idx}


def _run(*argv):
    return main(["-q", "scan", *map(str, argv)])


def test_scan_writes_ranked_scores_summary_and_detection_figures(suspect, tmp_path, capsys):
    out = tmp_path / "scan"
    assert _run(suspect["data"], "--ground-truth", suspect["manifest"], "--reference", suspect["reference"],
                "--detectors", FAST, "--out", out) == 0
    rows = list(csv.DictReader(io.StringIO((out / "scores.csv").read_text())))
    assert len(rows) == 500
    for name in FAST.split(","):
        assert {f"{name}_score", f"{name}_rank", f"{name}_flagged"} <= set(rows[0])
    assert sorted(int(r["index"]) for r in rows if r["poisoned"] == "1") == list(suspect["poisoned"])
    best = min(rows, key=lambda r: int(r["loss-outlier_rank"]))
    assert best["poisoned"] == "1"  # a flipped label is the hardest document for the model trained on it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "scan" and summary["n_documents"] == 500 and summary["skipped"] == []
    assert summary["model"]["source"] == "trained" and summary["model"]["train_accuracy"] > 0.8
    knowledge = {d["name"]: d["knowledge"] for d in summary["detectors"]}
    assert knowledge["perturbation-norm"] == "reference" and knowledge["loss-outlier"] == "model"
    figures = summary["detection"]
    assert figures["perturbation-norm"]["auroc"]["value"] == 1.0 and figures["perturbation-norm"]["flag_recall"] == 1
    assert figures["loss-outlier"]["auroc"]["value"] > 0.95
    records = [json.loads(line) for line in (out / "detection.jsonl").read_text().splitlines()]
    assert {r["detector"] for r in records} == set(FAST.split(",")) and records[0]["kind"] == "detection"
    assert "AUROC" in capsys.readouterr().out

    # the trained model is kept and reused; it also loads back as --model
    assert _run(suspect["data"], "--detectors", "loss-outlier", "--out", out) == 0
    assert json.loads((out / "summary.json").read_text())["model"]["reused"] is True
    again = tmp_path / "again"
    assert _run(suspect["data"], "--model", out / "model.pt", "--detectors", "loss-outlier", "--out", again) == 0
    assert json.loads((again / "summary.json").read_text())["model"]["source"] == "checkpoint"
    a = [r["loss-outlier_score"] for r in csv.DictReader(open(out / "scores.csv"))]
    b = [r["loss-outlier_score"] for r in csv.DictReader(open(again / "scores.csv"))]
    assert a == b


def test_scan_skips_what_it_cannot_run_and_says_why(suspect, tmp_path, capsys):
    config = tmp_path / "scan.yaml"
    config.write_text("scan:\n  detectors:\n    - {name: influence-outlier, params: {mode: forensic}}\n"
                      "    - {name: perturbation-norm}\n  bootstrap: 0\n")
    out = tmp_path / "scan"
    assert _run(suspect["data"], "--config", config, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    (skipped,) = summary["skipped"]
    assert skipped["name"] == "influence-outlier" and "--behaviour" in skipped["reason"]
    assert [d["knowledge"] for d in summary["detectors"]] == ["data"]
    assert "skipped" in capsys.readouterr().out


def test_scan_forensic_behaviour_from_an_npz(suspect, tmp_path):
    out = tmp_path / "scan"
    assert _run(suspect["data"], "--behaviour", f"{suspect['test']}:3:1", "--probe", suspect["test"],
                "--detectors", "influence-outlier", "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    (det,) = summary["detectors"]
    assert det["knowledge"] == "forensic" and summary["behaviour"]["class"] == 1


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


class _Hostile:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_npz(path, marker):
    x = np.zeros((4, 1, 8, 8), np.float32)
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, x)
        zf.writestr("x.npy", buf.getvalue())
        obj = np.empty(1, dtype=object)
        obj[0] = _Hostile(marker)
        buf = io.BytesIO()
        np.save(buf, obj, allow_pickle=True)
        zf.writestr("y.npy", buf.getvalue())
    return path


def _bad_inputs(tmp_path, suspect):
    ok_x = np.zeros((20, 1, 8, 8), np.float32)
    ok_y = np.arange(20) % 2
    nan_x = ok_x.copy()
    nan_x[3, 0, 1, 1] = np.nan
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.npz").write_bytes(b"\x93NUMPY not really" * 10)
    torch.save({"model": _Hostile(tmp_path / "ckpt-ran")}, tmp_path / "hostile.pt")
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "wrong.pt")
    data = suspect["data"]
    return {
        "pickle inside npz": ([_hostile_npz(tmp_path / "hostile.npz", tmp_path / "npz-ran")], "pickled"),
        "wrong shape": ([_write_npz(tmp_path / "shape.npz", x=np.zeros((20, 64), np.float32), y=ok_y)], "shape"),
        "label count": ([_write_npz(tmp_path / "count.npz", x=ok_x, y=ok_y[:5])], "labels must have shape"),
        "NaN": ([_write_npz(tmp_path / "nan.npz", x=nan_x, y=ok_y)], "NaN"),
        "negative label": ([_write_npz(tmp_path / "neg.npz", x=ok_x, y=ok_y - 1)], "labels must lie"),
        "label over --num-classes": ([data, "--num-classes", "5"], "labels must lie in 0..4"),
        "absurd labels": ([_write_npz(tmp_path / "big.npz", x=ok_x, y=ok_y * 10**6)], "corrupt labels"),
        "empty folder": ([tmp_path / "empty"], "no class sub-folders"),
        "missing file": ([tmp_path / "nope.npz"], "no such"),
        "not an npz": ([tmp_path / "garbage.npz"], "not a readable .npz"),
        "zip without arrays": ([tmp_path / "hostile.pt"], "missing array(s) x, y"),
        "hostile checkpoint": ([data, "--model", tmp_path / "hostile.pt"], "not a loadable checkpoint"),
        "wrong architecture": ([data, "--model", tmp_path / "wrong.pt"], "does not fit model"),
        "reference of other size": ([data, "--reference", suspect["test"]], "reference shape"),
        "bad behaviour": ([data, "--behaviour", "x"], "--behaviour"),
        "behaviour class": ([data, "--behaviour", f"{suspect['test']}:0:12"], "not one of"),
        "manifest of other data": ([suspect["test"], "--ground-truth", suspect["manifest"]], "manifest describes"),
        "unknown detector": ([data, "--detectors", "magic"], "unknown detector 'magic'"),
        "bad fraction": ([data, "--expected-fraction", "0.7"], "expected-fraction"),
    }


def test_hostile_or_corrupt_input_is_one_line_and_exit_2(suspect, tmp_path, capsys):
    for case, (args, message) in _bad_inputs(tmp_path, suspect).items():
        code = _run(*args, "--out", tmp_path / "out")
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{case}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1 and message in err, f"{case}: {err!r}"
        assert "Traceback" not in err
    assert not (tmp_path / "npz-ran").exists() and not (tmp_path / "ckpt-ran").exists()


def test_png_folder_and_cifar_folder_are_scanned(suspect, tmp_path, cifar10_root):
    from infusion_audit.data import load_npz

    folder = save_png_folder(tmp_path / "png", load_npz(suspect["reference"]).subset(np.arange(60)))
    out = tmp_path / "png-scan"
    assert _run(folder, "--detectors", "perturbation-norm", "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["grid"] == pytest.approx(1 / 255) and summary["detectors"][0]["flagged"] == 0
    assert summary["model"] is None and not (out / "model.pt").exists()  # a data-only scan trains nothing
    out = tmp_path / "cifar-scan"
    assert _run(cifar10_root, "--detectors", "perturbation-norm", "--out", out) == 0
    assert json.loads((out / "summary.json").read_text())["n_documents"] == 60
