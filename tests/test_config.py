import dataclasses
import logging
import subprocess
import sys

import pytest

from infusion_audit.config import (BUILTIN_CONFIGS, SECTIONS, AuditConfig, InfluenceConfig, load_config, resolve_config_path,
                                   with_defaults)
from infusion_audit.errors import ConfigError


def _load(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("text, message", [
    ("pipeline: {train: {lrr: 0.1}}", r"c.yaml: pipeline.train.lrr: expected no such key \(known: optimizer"),
    ("pipeline: {train: {epochs: ten}}", "pipeline.train.epochs: expected an integer, got 'ten'"),
    ("pipeline: {train: {lr: 0}}", r"pipeline.train.lr: expected a value > 0, got 0.0"),
    ("pipeline: {train: {batch_size: 0}}", "pipeline.train.batch_size: expected a value >= 1"),
    ("pipeline: {train: {momentum: 1.5}}", "pipeline.train.momentum: expected a value <= 1"),
    ("pipeline: {train: {order: random}}", "pipeline.train.order: expected one of 'fixed', 'reshuffle'"),
    ("pipeline: {model: {params: {}}}", "pipeline.model.name: expected a value \\(the key is required\\)"),
    ("pipeline: [1, 2]", r"pipeline: expected a mapping \(PipelineConfig\)"),
    ("- just\n- a list", r"\(top level\): expected a mapping"),
    ("pipeline: {train: {lr: [}", "expected valid YAML \\(syntax error at line 1\\)"),
    ("influence: {backend: lissa}", "influence.backend: expected one of 'ekfac', 'exact', 'projected'"),
    ("influence: {damping: auto}", "influence.damping: expected a number > 0 \\(auto is for backend projected\\)"),
    ("influence: {backend: projected, fit_size: 100}", "influence.fit_size: expected a count >= 2, with backend ekfac"),
    ("influence: {damping: -1}", "influence.damping: expected a number > 0"),
    ("scenario: {}\npipeline: {}", "scenario: expected either scenario \\(the old name\\) or pipeline"),
    ("attack: {influence: {damping: 0.1}}\ninfluence: {damping: 0.2}",
     "attack.influence: expected the same settings as the influence section"),
])
def test_bad_configs_name_file_key_and_expectation(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        _load(tmp_path, text)
    assert "\n" not in str(info.value) and "c.yaml" in str(info.value)


def test_valid_config_and_scientific_notation(tmp_path):
    cfg = _load(tmp_path, "pipeline: {train: {lr: 1e-2, epochs: 3, schedule: {name: MultiStepLR, params: {milestones: [2]}}}}")
    assert cfg.pipeline.train.lr == 0.01 and cfg.pipeline.train.schedule.params == {"milestones": [2]}
    assert cfg.pipeline.dataset.name == "digits"


def test_schema_1_keys_load_as_todays_with_one_warning_each(tmp_path, caplog):
    """`scenario` -> `pipeline`, `scenario.pipeline` -> `pipeline.factory`, attack/scan influence -> `influence`."""
    old = ("scenario: {pipeline: {name: image}, train: {epochs: 3}}\n"
           "attack: {influence: {backend: exact, damping: 0.01}}\nscan: {influence: {backend: exact, damping: 0.01}}")
    with caplog.at_level(logging.WARNING, logger="infusion_audit.config"):
        cfg = _load(tmp_path, old)
    assert cfg.pipeline.factory.name == "image" and cfg.pipeline.train.epochs == 3
    assert cfg.influence == InfluenceConfig(backend="exact", damping=0.01)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4 and all("\n" not in w and "c.yaml" in w for w in warnings)
    assert any("'scenario' is now called 'pipeline'" in w for w in warnings)


def test_loading_checks_and_only_with_defaults_fills_in(tmp_path):
    cfg = _load(tmp_path, "attack: {targets: {n: 2}}")
    assert cfg.pipeline is None and cfg.attack.attacks == []  # what the file said, nothing more
    filled = with_defaults(cfg)
    assert filled.pipeline.dataset.name == "digits" and [a.name for a in filled.attack.attacks][:1] == ["infusion"]
    assert cfg.attack.attacks == []  # filling in returns a new config
    text = with_defaults(_load(tmp_path, "pipeline: {dataset: {name: caesar}}"))
    assert [a.name for a in text.attack.attacks] == ["infusion-text", "random-tokens", "probe-insertion-text"]


def test_sections_are_the_audit_configs_fields():
    assert SECTIONS == tuple(f.name for f in dataclasses.fields(AuditConfig))
    assert {"pipeline", "influence", "attack", "scan", "defence", "mitigations"} <= set(SECTIONS)


def test_influence_identity_keeps_schema_1_cache_keys():
    """Cell keys hash the influence settings: the defaults hash as schema 1's {backend, damping} did."""
    assert InfluenceConfig().identity() == {"backend": "ekfac", "damping": 1e-3}
    assert InfluenceConfig(fit_size=500).identity() == {"backend": "ekfac", "damping": 1e-3, "fit_size": 500}


def test_builtin_config_names_resolve(tmp_path, monkeypatch):
    assert resolve_config_path("digits").name == "digits.yaml"
    assert resolve_config_path("digits").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a user's data folder does not shadow the built-in config
    assert resolve_config_path("digits").name == "digits.yaml" and resolve_config_path("digits").is_file()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="mine: expected a YAML file or a built-in config name \\(this is a folder\\)"):
        resolve_config_path("mine")


def test_every_builtin_config_loads_and_fills_in():
    """A built-in that README names is checked like a user's file and names plugins that exist, so a typo in one
    fails here, not in a run."""
    names = sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))
    assert {"bench-digits", "bench-digits-backdoor", "bench-mnist", "bench-mnist-backdoor", "mnist"} <= set(names)
    from infusion_audit.registry import ATTACKS, DATASETS, DETECTORS, MODELS

    for name in names:
        config = with_defaults(load_config(name))
        DATASETS.get(config.pipeline.dataset.name)  # each plugin it names exists (an unknown one raises)
        if config.pipeline.model is not None:
            MODELS.get(config.pipeline.model.name)
        arms = {spec.name for spec in config.attack.attacks}
        for spec in config.attack.attacks:
            attack = ATTACKS.get(spec.name)(**spec.params)  # its params are its own (a misspelt one raises)
            like = attack.get_params().get("like")
            assert like is None or like in arms, f"{name}: {spec.name} copies the documents of {like!r}, no arm"
        for spec in config.scan.detectors:
            DETECTORS.get(spec.name)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("pipeline: {train: {epochs: -1}}")
    for args in (["train", "bad.yaml", "--out", "o"], ["train", "missing.yaml", "--out", "o"]):
        proc = subprocess.run([sys.executable, "-m", "infusion_audit", *args], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("infusion-audit: error: ") and "Traceback" not in proc.stderr


def test_set_overrides_a_key_and_is_checked_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline: {train: {epochs: 3}}\n")
    cfg = load_config(path, overrides=["pipeline.train.seed=2", "attack.targets.n=4", "influence.damping=1e-2"])
    assert cfg.pipeline.train.seed == 2 and cfg.pipeline.train.epochs == 3 and cfg.attack.targets.n == 4
    assert cfg.influence.damping == 0.01
    assert load_config(path).pipeline.train.seed == 0  # the file itself is untouched
    with pytest.raises(ConfigError, match="c.yaml: pipeline.train.seed: expected an integer, got 'two'"):
        load_config(path, overrides=["pipeline.train.seed=two"])
    with pytest.raises(ConfigError, match="--set: seed: expected KEY=VALUE with a dotted key"):
        load_config(path, overrides=["seed"])
    with pytest.raises(ConfigError, match="pipeline.train.epochs to be a mapping"):
        load_config(path, overrides=["pipeline.train.epochs.x=1"])
