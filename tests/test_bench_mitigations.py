"""The bench's mitigations axis: each cell retrained under each mitigation against its own clean control."""

import pytest

from infusion_audit import bench
from infusion_audit.errors import ConfigError
from infusion_audit.io import read_jsonl

CONFIG = {
    "pipeline": {"dataset": {"name": "digits"}, "model": {"name": "digits-cnn"},
                 "train": {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 3, "seed": 0}},
    "influence": {"backend": "exact"},
    "attack": {"attacks": [{"name": "label-flip"}, {"name": "probe-insertion", "params": {"copies": 1}}],
               "budget": {"k": 14}, "targets": {"n": 1, "seed": 0}},
    "mitigations": [{"name": "clip", "params": {"max_grad_norm": 1.0}}, {"name": "partition", "params": {"parts": 3}}],
    "scan": {"detectors": [{"name": "loss-outlier"}], "bootstrap": 0},
    "defence": {"enabled": False},
}


def test_each_cell_is_measured_under_each_mitigation_against_its_own_control(tmp_path):
    bench(CONFIG, tmp_path, progress=False, report=False)
    records = read_jsonl(tmp_path / "results.jsonl")
    plain = {r["cell"]: r for r in records if r["kind"] == "attack"}
    mitigated = [r for r in records if r["kind"] == "mitigation"]
    assert len(plain) == 2 and sorted((r["attack"], r["mitigation"]) for r in mitigated) == [
        ("label-flip", "clip"), ("label-flip", "partition"), ("probe-insertion", "clip"), ("probe-insertion", "partition")]
    for r in mitigated:
        base = plain[r["cell"]]
        assert r["acc_unmitigated"] == base["acc_control"] and r["victim"] == base["victim"]
        assert r["delta_logodds"] == pytest.approx(r["logodds_poisoned"] - r["logodds_control"])
        assert r["timings"]["retrain"] > 0 and r["timings"]["retrain_unmitigated"] == base["timings"]["retrain"]
    partition = [r for r in mitigated if r["mitigation"] == "partition"]
    assert all(r["figures"]["parts"] == 3 and r["figures"]["certified_radius_edit"] >= 0 for r in partition)
    clip = [r for r in mitigated if r["mitigation"] == "clip"]
    assert all(0 <= r["figures"]["clipped_fraction"] <= 1 for r in clip)
    assert clip[0]["logodds_control"] != plain[clip[0]["cell"]]["logodds_control"]  # its own control, clipped


def test_an_unknown_mitigation_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"mitigations\[0\].name"):
        bench({**CONFIG, "mitigations": [{"name": "nope"}]}, tmp_path, progress=False)
