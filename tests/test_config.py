import subprocess
import sys

import pytest

from infusion_audit.config import TrainRunConfig, load_config, resolve_config_path
from infusion_audit.errors import ConfigError


def _load(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(TrainRunConfig, path)


@pytest.mark.parametrize("text, message", [
    ("scenario: {train: {lrr: 0.1}}", r"c.yaml: scenario.train.lrr: expected no such key \(known: optimizer"),
    ("scenario: {train: {epochs: ten}}", "scenario.train.epochs: expected an integer, got 'ten'"),
    ("scenario: {train: {lr: 0}}", r"scenario.train.lr: expected a value > 0, got 0.0"),
    ("scenario: {train: {batch_size: 0}}", "scenario.train.batch_size: expected a value >= 1"),
    ("scenario: {train: {momentum: 1.5}}", "scenario.train.momentum: expected a value <= 1"),
    ("scenario: {train: {order: random}}", "scenario.train.order: expected one of 'fixed', 'reshuffle'"),
    ("scenario: {model: {params: {}}}", "scenario.model.name: expected a value \\(the key is required\\)"),
    ("scenario: [1, 2]", r"scenario: expected a mapping \(ScenarioConfig\)"),
    ("- just\n- a list", r"\(top level\): expected a mapping"),
    ("scenario: {train: {lr: [}", "expected valid YAML \\(syntax error at line 1\\)"),
])
def test_bad_configs_name_file_key_and_expectation(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        _load(tmp_path, text)
    assert "\n" not in str(info.value) and "c.yaml" in str(info.value)


def test_valid_config_and_scientific_notation(tmp_path):
    cfg = _load(tmp_path, "scenario: {train: {lr: 1e-2, epochs: 3, schedule: {name: MultiStepLR, params: {milestones: [2]}}}}")
    assert cfg.scenario.train.lr == 0.01 and cfg.scenario.train.schedule.params == {"milestones": [2]}
    assert cfg.scenario.dataset.name == "digits"


def test_builtin_config_names_resolve():
    assert resolve_config_path("digits").name == "digits.yaml"
    assert resolve_config_path("digits").exists()


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("scenario: {train: {epochs: -1}}")
    for args in (["train", "bad.yaml", "--out", "o"], ["train", "missing.yaml", "--out", "o"]):
        proc = subprocess.run([sys.executable, "-m", "infusion_audit", *args], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("infusion-audit: error: ") and "Traceback" not in proc.stderr
