"""The attack-then-defend benchmark on a small real run: complete records, resume, interruption, jobs."""

import json
import subprocess
import sys
import time

import pytest

from infusion_audit.config import AuditConfig, load_config, with_defaults
from infusion_audit.grid import Grid
from infusion_audit.errors import ConfigError
from infusion_audit.io import read_jsonl


def _records(run_dir, kind):
    return [r for r in read_jsonl(run_dir / "results.jsonl") if r["kind"] == kind]


def test_every_cell_has_attack_detection_and_defence_records(small_bench):
    run_dir, report = small_bench
    attacks = _records(run_dir, "attack")
    assert sorted({r["attack"] for r in attacks}) == ["infusion", "label-flip", "probe-insertion"]
    assert len(attacks) == 2 * 3 and len({r["cell"] for r in attacks}) == 6
    detections, defences = _records(run_dir, "detection"), _records(run_dir, "defence")
    detectors = {r["detector"] for r in detections}
    assert {"spectral-signature", "influence-outlier", "perturbation-norm", "loss-outlier"} <= detectors
    for cell in {r["cell"] for r in attacks}:
        assert {r["detector"] for r in detections if r["cell"] == cell} == detectors
        assert {r["detector"] for r in defences if r["cell"] == cell} == detectors
    for r in defences:  # what is left is measured against the clean set with the same documents removed
        assert 0 <= r["removed_poisons"] <= r["removed"] and 0 <= r["acc_after"] <= 1
        assert r["delta_p_after"] == pytest.approx(r["p_after"] - r["p_control_removed"])
    reference = [r for r in detections if r["detector"] == "perturbation-norm" and r["attack"] == "infusion"]
    assert all(r["auroc"]["value"] == 1.0 for r in reference)  # any edit is visible against a reference copy
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["data"]["n_train"] == 1438 and provenance["packages"]["torch"]
    assert report.exists() and "Verdict" in report.read_text()


def test_rerun_resumes_in_seconds_without_new_records(small_bench):
    from infusion_audit import bench

    run_dir, _ = small_bench
    before = (run_dir / "results.jsonl").read_bytes()
    t0 = time.perf_counter()
    bench(run_dir / "config.yaml", run_dir, progress=False)
    assert time.perf_counter() - t0 < 30
    assert (run_dir / "results.jsonl").read_bytes() == before


def test_a_killed_run_loses_at_most_the_cell_in_flight(small_bench, tmp_path):
    """Drop the last cell's records and tear the file mid-line, as a kill during a write would."""
    from infusion_audit import bench

    run_dir, _ = small_bench
    records = read_jsonl(run_dir / "results.jsonl")
    last = records[-1]["cell"]
    kept = [r for r in records if r["cell"] != last]
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    text = "".join(json.dumps(r) + "\n" for r in kept) + '{"kind": "attack", "cell": "torn'
    (copy / "results.jsonl").write_text(text)
    bench(copy / "config.yaml", copy, progress=False, report=False)
    resumed = read_jsonl(copy / "results.jsonl")
    assert len(resumed) == len(records)
    assert sorted(r["cell"] for r in resumed if r["kind"] == "attack") == sorted(
        r["cell"] for r in records if r["kind"] == "attack")


def test_parallel_jobs_give_the_same_cells(small_bench, tmp_path):
    from infusion_audit import bench

    run_dir, _ = small_bench
    config = load_bench_config(run_dir / "config.yaml")
    config.defence.enabled = False
    config.scan.detectors = [{"name": "loss-outlier"}]
    config = load_bench_config_from(config, tmp_path)
    bench(config, tmp_path / "par", jobs=2, progress=False, report=False)
    serial = {r["cell"]: r["delta_logodds"] for r in _records(run_dir, "attack")}
    parallel = {r["cell"]: r["delta_logodds"] for r in _records(tmp_path / "par", "attack")}
    assert parallel.keys() == serial.keys()
    # the same poisons and retrains in other processes; one thread per worker only reorders float sums
    assert [parallel[c] for c in serial] == pytest.approx(list(serial.values()), rel=1e-3, abs=1e-6)


def load_bench_config(config) -> AuditConfig:
    return with_defaults(load_config(config))


def load_bench_config_from(config: AuditConfig, tmp_path) -> AuditConfig:
    """Round-trip through YAML, as a user's edited copy would be."""
    from infusion_audit.config import dump_yaml

    path = tmp_path / "edited.yaml"
    path.write_text(dump_yaml(config))
    return load_bench_config(path)


def test_transfer_victims_are_measured_separately(tmp_path):
    config = load_bench_config_from(with_defaults(AuditConfig()), tmp_path)
    config.attack.targets.n = 1
    config.attack.attacks = config.attack.attacks[:1]
    config.victims = [{"name": "digits-cnn", "params": {"width": 8}}]
    config.scan.detectors = [{"name": "loss-outlier"}]
    config.defence.enabled = False
    config = load_bench_config_from(config, tmp_path)
    grid = Grid(config, tmp_path / "transfer", progress=False)
    assert len(grid.victims) == 2
    records = [r for r in grid.run_cell(grid.units()[0][0]) if r.kind == "attack"]
    assert len(records) == 2 and records[0].cell == records[1].cell
    assert records[0].acc_control != records[1].acc_control  # a different model, its own control
    assert records[1].variant.endswith("→ " + records[1].victim)  # its own arm in the report


@pytest.mark.parametrize("text, message", [
    ("budgets: [{k: 0, eps: 0.1}]", "budgets\\[0\\].k"),
    ("victims: [{name: no-such-model}]", "victims\\[0\\].name: expected a known model"),
    ("scan: {detectors: [{name: nope}]}", "nope"),
    ("defence: {enabled: maybe}", "defence.enabled: expected true or false"),
    ("reports: {}", "reports: expected a known section"),
])
def test_bad_bench_configs(tmp_path, text, message):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_bench_config(path)
    assert "\n" not in str(info.value)


def test_bench_cli_rejects_bad_jobs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "infusion_audit", "bench", "--jobs", "0", "--out", "o"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "--jobs" in proc.stderr and "Traceback" not in proc.stderr
