"""The Caesar pipeline on every machine: a recipe that learns under 1 and 2 threads, `train` for text
pipelines, the quality floor and the thread setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from infusion_audit.cli import main
from infusion_audit.config import TrainConfig, from_dict
from infusion_audit.errors import ConfigError
from infusion_audit.runtime import DEFAULT_THREADS, runtime_info
from infusion_audit.training import make_optimizer

TINY_CAESAR = {
    "dataset": {"name": "caesar", "params": {"n_train": 300, "n_test": 60, "alphabet": 5, "length": 3,
                                              "min_shift": 1, "max_shift": 2}},
    "model": {"name": "tiny-gpt-neo", "params": {"hidden": 32, "layers": 2, "heads": 2}},
    "train": {"optimizer": "adam", "lr": 0.005, "batch_size": 16, "epochs": 2, "seed": 0},
}


def _config(tmp_path, pipeline: dict, **sections) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"pipeline": pipeline, **sections}))
    return str(path)


# --------------------------------------------------------------------------- the recipe
@pytest.mark.slow
def test_builtin_caesar_learns_with_one_and_two_threads(tmp_path):
    """The built-in recipe decrypts >= 95% of the test prompts whether torch adds with 1 or 2 threads (the
    previous recipe stayed on its plateau, decryption accuracy 0.0, with 2). About 30 s per run on 2 cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for n in (1, 2):
        out = tmp_path / f"threads-{n}"
        run = subprocess.run([sys.executable, "-m", "infusion_audit", "-q", "--threads", str(n), "train", "caesar",
                              "--out", str(out)], env=env, capture_output=True, text=True, timeout=900,
                             cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert "decryption accuracy" in run.stdout
        (metrics,) = (out / "artefacts").glob("train-*/metrics.json")
        figures = json.loads(metrics.read_text())
        assert figures["test"]["decryption_accuracy"] >= 0.95, (n, figures["history"])


def test_adam_betas_reach_the_optimizer_and_bad_ones_fail_in_one_line():
    """The Caesar recipe leaves its plateau within 3 epochs with beta2 = 0.98 (Adam's default 0.999 lags; see
    benchmarks/caesar_recipe.py): the option must reach torch's optimizer."""
    cfg = from_dict(TrainConfig, {"optimizer": "adam", "adam_betas": [0.9, 0.98]})
    assert make_optimizer(torch.nn.Linear(2, 2), cfg).defaults["betas"] == (0.9, 0.98)
    assert make_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="adam")).defaults["betas"] == (0.9, 0.999)
    for bad in ([0.9, 1.0], [0.9], [-0.1, 0.9]):
        with pytest.raises(ConfigError, match=r"adam_betas: expected two numbers in \[0, 1\)"):
            from_dict(TrainConfig, {"adam_betas": bad})


# --------------------------------------------------------------------------- train, floor, threads
def test_train_command_trains_text_pipelines(tmp_path, capsys):
    assert main(["-q", "train", _config(tmp_path, TINY_CAESAR), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "decryption accuracy" in out and "token accuracy" in out
    (folder,) = (tmp_path / "run" / "artefacts").glob("train-*")
    assert sorted(p.name for p in folder.glob("epoch-*.pt")) == ["epoch-000.pt", "epoch-001.pt", "epoch-002.pt"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(0 <= h["decryption_accuracy"] <= 1 for h in metrics["history"])
    assert f"decryption accuracy {metrics['test']['decryption_accuracy']:.4f}" in out


def test_a_text_model_below_its_floor_is_not_attacked(tmp_path, capsys):
    """Two epochs of a tiny model do not learn to decrypt: bench refuses with one line naming figure and floor."""
    config = _config(tmp_path, {**TINY_CAESAR, "quality_floor": 0.95}, attack={"targets": {"pairs": [[1, 2]]}})
    assert main(["-q", "bench", config, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "decryption accuracy is 0." in err and "quality floor 0.95" in err
    assert not (tmp_path / "run" / "results.jsonl").exists() or not (tmp_path / "run" / "results.jsonl").read_text()


def test_an_image_model_below_its_floor_is_not_attacked(tmp_path, capsys):
    config = _config(tmp_path, {"dataset": {"name": "digits"}, "train": {"epochs": 1, "lr": 0.001},
                                "quality_floor": 0.99})
    assert main(["-q", "attack", config, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test accuracy is 0." in err and "quality floor 0.99" in err


def test_threads_are_set_for_the_run_and_recorded_with_the_task_quality(tmp_path, capsys):
    """--threads sets torch's threads (default 1) for any command; a minimal text bench records them and the
    trained model's decryption accuracy in provenance.json, and the report states it next to the verdict.
    Raising the floor to that figure retrains and reruns nothing: the floor is not part of the model's identity."""
    assert main(["--threads", "0", "plugins"]) == 2
    assert "threads must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--threads", "2", "plugins"]) == 0 and torch.get_num_threads() == 2
    torch.set_num_threads(3)  # not the default: provenance must show what main set
    sections = {"attack": {"attacks": [{"name": "random-tokens", "params": {"like": None}}], "budget": {"k": 4},
                           "targets": {"pairs": [[1, 2]], "probes": 4}},
                "scan": {"attacks": ["infusion-text"]}}  # nothing scanned: no Infusion arm here
    run = tmp_path / "run"
    assert main(["-q", "bench", _config(tmp_path, TINY_CAESAR, **sections), "--out", str(run)]) == 0
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["compute"] == runtime_info("cpu") and provenance["compute"]["torch_threads"] == DEFAULT_THREADS
    quality = provenance["task_quality"]
    assert quality["figure"] == "decryption accuracy" and quality["floor"] == 0.0
    (victim,) = provenance["training"].values()
    assert quality["value"] == victim["quality"]["value"]
    page = (run / "report.html").read_text(encoding="utf-8")
    assert f"decryption accuracy before any attack: <strong>{quality['value']:.3f}</strong>" in page

    trained = sorted((run / "artefacts").glob("train-*"))
    config = _config(tmp_path, {**TINY_CAESAR, "quality_floor": quality["value"]}, **sections)
    assert main(["-q", "bench", config, "--out", str(run)]) == 0
    assert sorted((run / "artefacts").glob("train-*")) == trained
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and np.isfinite(records[0]["delta_logodds"])  # the finished cell was not rerun
