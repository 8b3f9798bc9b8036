"""`--device auto|cpu|cuda`: one resolver that changes nothing, one set-up (`runtime.configure`) that the command line
calls once, a one-line error where CUDA is missing, and the device reaching training, the attack and what a run
records. The CUDA run is skipped where no CUDA device is present."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from infusion_audit import runtime
from infusion_audit.cli import main
from infusion_audit.config import PipelineConfig, TrainConfig, from_dict
from infusion_audit.errors import ConfigError, UserError
from infusion_audit.io import read_jsonl
from infusion_audit.pipeline import Pipeline

# A digits attack in seconds: a short recipe, one target, one Infusion arm with a few PGD steps.
TINY_ATTACK = {
    "pipeline": {"dataset": {"name": "digits"}, "train": {"epochs": 2}},
    "attack": {"attacks": [{"name": "infusion", "params": {"steps": 5}}], "targets": {"n": 1, "seed": 0},
               "budget": {"k": 0.01, "eps": 0.0625}},
}


@pytest.fixture
def no_cuda(monkeypatch):
    """This process as a machine without a CUDA device sees it, whatever machine runs the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device as far as resolving names goes (nothing may compute on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def cuda_settings_restored():
    """The process-wide CUDA settings `configure` makes on cuda, unset for the test and as they were after it."""
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    deterministic, *flags, workspace = cuda_settings()
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = flags
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if workspace is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def cuda_settings() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def _attack(tmp_path, name: str, device: str, config: dict = TINY_ATTACK) -> tuple[int, list[dict]]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["-q", "--device", device, "attack", str(path), "--out", str(tmp_path / name)])
    return code, read_jsonl(tmp_path / name / "results.jsonl") if code == 0 else []


def test_resolver_names(no_cuda):
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="device cuda asked for, but") as cuda:
        runtime.resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device 'tpu'; use one of auto, cpu, cuda") as unknown:
        runtime.resolve_device("tpu")
    assert "\n" not in str(cuda.value) and "\n" not in str(unknown.value)


def test_auto_is_cuda_where_present_and_resolving_changes_nothing(fake_cuda):
    before = (cuda_settings(), torch.get_num_threads())
    assert runtime.resolve_device("auto") == torch.device("cuda")
    assert runtime.resolve_device("cuda") == torch.device("cuda")
    assert (cuda_settings(), torch.get_num_threads()) == before


def test_configure_sets_threads_idempotently(no_cuda):
    from threadpoolctl import threadpool_info

    before = cuda_settings()
    try:
        for _ in range(2):
            assert runtime.configure(2) == {"threads": 2, "deterministic_cuda": False}
            assert torch.get_num_threads() == 2 and {p["num_threads"] for p in threadpool_info()} == {2}
            assert os.environ["OMP_NUM_THREADS"] == "2" and cuda_settings() == before
    finally:
        runtime.configure(1)
    with pytest.raises(UserError, match="threads must be >= 1, got 0"):
        runtime.configure(0)


def test_configure_on_cuda_sets_deterministic_fp32_kernels(fake_cuda, cuda_settings_restored):
    """What a cuda run computes with, set by `configure` (here where no CUDA device is needed to set it); on the
    cpu it leaves CUDA alone."""
    before = cuda_settings()
    assert runtime.configure(1, "cpu") == {"threads": 1, "deterministic_cuda": False} and cuda_settings() == before
    for device in ("cuda", "auto", None):  # None: wherever there is a CUDA device
        assert runtime.configure(1, device) == {"threads": 1, "deterministic_cuda": True}
        assert cuda_settings() == (True, True, False, False, False, os.environ["CUBLAS_WORKSPACE_CONFIG"])
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without a deterministic kernel warns


def test_the_command_line_configures_once(no_cuda, monkeypatch):
    from infusion_audit import cli

    calls = []
    monkeypatch.setattr(cli, "configure", lambda *args: calls.append(args))
    assert main(["--threads", "2", "--device", "cpu", "plugins"]) == 0 and calls == [(2, "cpu")]
    calls.clear()
    assert main(["plugins"]) == 0 and calls == [(runtime.DEFAULT_THREADS, None)]


def test_runtime_info_names_what_changes_the_last_bits(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = runtime.runtime_info("cpu")
    assert info == {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": "cpu"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert runtime.runtime_info("cpu")["aten_cpu_capability"] == "avx2"


def test_cli_cuda_without_cuda_is_one_line_exit_2(no_cuda, tmp_path, capsys):
    assert main(["--device", "cuda", "train", "digits", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infusion-audit: error: device cuda asked for") and "\n" not in err
    assert not (tmp_path / "t").exists()  # refused before any work
    with pytest.raises(SystemExit) as bad:  # argparse's own choice check, exit code 2
        main(["--device", "tpu", "plugins"])
    assert bad.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_config_device_is_checked_and_auto_is_valid():
    assert from_dict(TrainConfig, {"device": "auto"}, "x.yaml").device == "auto"
    with pytest.raises(ConfigError, match=r"x.yaml: train.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'"):
        from_dict(PipelineConfig, {"train": {"device": "gpu"}}, "x.yaml")


def test_device_is_resolved_into_the_fingerprint(fake_cuda, monkeypatch):
    """A pipeline records the device it computes on, never `auto`: checkpoints and bench cells trained on cuda are
    never reused for cpu ones (their numbers differ in the last bits), and `auto` shares the cache of what it means."""
    on = {name: Pipeline(PipelineConfig(train=TrainConfig(device=name))) for name in ("auto", "cpu", "cuda")}
    assert [on[name].config.train.device for name in on] == ["cuda", "cpu", "cuda"]
    assert on["auto"].fingerprint() == on["cuda"].fingerprint() != on["cpu"].fingerprint()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Pipeline(PipelineConfig(train=TrainConfig(device="auto"))).fingerprint() == on["cpu"].fingerprint()


def test_ray_on_cuda_needs_gpus_per_worker(fake_cuda, cuda_settings_restored, tmp_path):
    from infusion_audit import bench

    with pytest.raises(UserError, match="--gpus-per-worker"):
        bench(None, tmp_path / "run", executor="ray", device="cuda")
    assert not (tmp_path / "run").exists()


def test_cpu_attack_end_to_end(no_cuda, tmp_path):
    """`--device cpu` through the command line: the run records the device, its checkpoints hold CPU tensors, and
    `auto` on a machine without CUDA is the same run (the same cell: resumed, not recomputed)."""
    code, records = _attack(tmp_path, "run", "cpu")
    assert code == 0 and len(records) == 1
    record = records[0]
    assert all(math.isfinite(record[k]) for k in ("p_before", "p_control", "p_poisoned", "delta_logodds"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["pipeline"]["train"]["device"] == "cpu"
    (checkpoint,) = (tmp_path / "run" / "artefacts").glob("train-*/epoch-002.pt")
    state = torch.load(checkpoint, weights_only=True)  # no map_location: every tensor must already be on the CPU
    assert {t.device.type for t in state["model"].values()} == {"cpu"}
    before = (tmp_path / "run" / "results.jsonl").read_text()
    assert _attack(tmp_path, "run", "auto")[0] == 0
    assert (tmp_path / "run" / "results.jsonl").read_text() == before


# The exact IHVP (conjugate gradient, no sampled labels), so both devices compute the same mathematics; a recipe
# that learns the task (test accuracy 0.95 on the CPU) and an attack with a clear effect (Δ log-odds 1.98 there).
DEVICE_ATTACK = {
    "pipeline": {"dataset": {"name": "digits"}, "train": {"epochs": 6}},
    "influence": {"backend": "exact", "damping": 0.1},
    "attack": {"attacks": [{"name": "infusion", "params": {"steps": 10, "quantize": False}}],
               "targets": {"n": 1, "seed": 0}, "budget": {"k": 0.02, "eps": 0.125}},
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_digits_attack_on_cuda_matches_cpu(tmp_path):
    """The same attack end to end on cpu and on cuda: finite figures in the same place. Summation order alone moves
    them: on the CPU, --threads 2 instead of 1 (measured) moves the control's log-odds by 0.09, Δ log-odds from 1.98
    to 2.24, predicted Δf by 2%, and keeps 25 of the 29 poisoned documents; the bounds allow a few times that."""
    assert cuda_settings()[:5] == (True, True, False, False, False)  # the session's configure(), as main's
    code_cpu, (cpu,) = _attack(tmp_path, "cpu", "cpu", DEVICE_ATTACK)
    torch.cuda.reset_peak_memory_stats()
    code_cuda, (cuda,) = _attack(tmp_path, "cuda", "cuda", DEVICE_ATTACK)
    assert code_cpu == code_cuda == 0 and torch.cuda.max_memory_allocated() > 0  # it did compute on the GPU
    assert yaml.safe_load((tmp_path / "cuda" / "config.yaml").read_text())["pipeline"]["train"]["device"] == "cuda"
    trained = {name: {p.name for p in (tmp_path / name / "artefacts").glob("train-*")} for name in ("cpu", "cuda")}
    assert trained["cpu"].isdisjoint(trained["cuda"])  # the device is in the checkpoints' fingerprint
    (checkpoint,) = (tmp_path / "cuda" / "artefacts").glob("train-*/epoch-006.pt")
    state = torch.load(checkpoint, weights_only=True)  # written on cuda, readable without one
    assert {t.device.type for t in state["model"].values()} == {"cpu"}
    figures = ("p_before", "p_control", "p_poisoned", "logodds_control", "logodds_poisoned", "delta_logodds",
               "acc_control", "acc_poisoned", "predicted_delta_f")
    assert all(math.isfinite(cuda[k]) for k in figures), {k: cuda[k] for k in figures}
    assert cuda["acc_control"] == pytest.approx(cpu["acc_control"], abs=0.02)
    assert cuda["logodds_control"] == pytest.approx(cpu["logodds_control"], abs=0.5)
    assert cuda["predicted_delta_f"] == pytest.approx(cpu["predicted_delta_f"], rel=0.2)
    overlap = set(cuda["poisoned_indices"]) & set(cpu["poisoned_indices"])
    assert len(overlap) >= 0.6 * len(cpu["poisoned_indices"]), json.dumps([cpu["poisoned_indices"],
                                                                          cuda["poisoned_indices"]])
    assert cpu["delta_logodds"] > 1 and cuda["delta_logodds"] == pytest.approx(cpu["delta_logodds"], rel=0.35)
