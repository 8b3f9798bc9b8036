"""examples/: a user's own pipeline (digits_pipeline.py: its CNN, its loop with augmentation and a cosine
schedule) retrained deterministically, run through `bench` and `scan` from its YAML, measured as the victim
of an attack crafted on the built-in model, and the README's "Audit your own pipeline" snippets."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import infusion_audit
from infusion_audit import Checkpoint, Pipeline
from infusion_audit.cli import main
from infusion_audit.config import PluginSpec, PipelineConfig, from_dict
from infusion_audit.data import DatasetSplit, digits, save_npz

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIG = EXAMPLES / "digits_pipeline.yaml"
README = ROOT / "README.md"
NAME = "digits_pipeline:AugmentedDigits"


@pytest.fixture(scope="module", autouse=True)
def importable():
    """The example module importable as its YAML names it (as `PYTHONPATH=examples` makes it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        yield


def small_config(**train) -> dict:
    """The example's YAML, reduced to seconds: half of digits to train on, 2 epochs, 2 targets, 1 detector."""
    config = yaml.safe_load(CONFIG.read_text())
    pipeline = config["pipeline"]
    pipeline["dataset"]["params"]["test_fraction"] = 0.5
    pipeline["train"].update({"epochs": 2, "batch_size": 16, **train})
    pipeline["quality_floor"] = 0.0
    config["attack"]["targets"]["n"] = 2
    config["scan"].update({"detectors": [{"name": "loss-outlier"}], "bootstrap": 0})
    return config


@pytest.fixture(scope="module")
def split():
    """300 training and 100 test digits: enough to train on for a few epochs in a second."""
    full = digits()
    return DatasetSplit(full.train.subset(np.arange(300)), full.test.subset(np.arange(100)))


def pipeline_on(split) -> Pipeline:
    config = from_dict(PipelineConfig, small_config(epochs=4)["pipeline"], "<test>", "pipeline")
    return Pipeline.from_config(config, data=split)


def parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def trained(split):
    """The example pipeline trained for 4 epochs on `split`, with the checkpoint its fit gave after each."""
    pipeline = pipeline_on(split)
    checkpoints: list[Checkpoint] = []
    model = pipeline.fit(pipeline.new_model(), split.train, on_epoch=checkpoints.append)
    return pipeline, model, checkpoints


def test_retrains_from_one_checkpoint_are_bit_identical_and_differ_only_by_the_data(split, trained):
    pipeline, model, checkpoints = trained
    assert type(pipeline).__name__ == "AugmentedDigits" and pipeline.order(split.train, 0).shape == (300,)
    assert [c.epoch for c in checkpoints] == [1, 2, 3, 4] and "schedule" in checkpoints[2].meta
    assert pipeline.quality(model)[1] > 0.4  # it learns (0.56 measured; chance: 0.1)

    # the paper's retrain: from epoch 3, one more epoch, twice -> the same bits; and the same as never stopping
    first = parameters(pipeline.continue_training(checkpoints[2], split.train))
    second = parameters(pipeline.continue_training(checkpoints[2], split.train))
    for a, b, c in zip(first, second, parameters(model)):
        assert torch.equal(a, b) and torch.equal(a, c)

    # one document a grey level brighter: the retrain moves
    x = split.train.x[[7]].copy()
    edited = split.train.with_documents([7], np.clip(x + 1 / 16, 0, 1))
    moved = parameters(pipeline.continue_training(checkpoints[2], edited))
    assert any(not torch.equal(a, b) for a, b in zip(first, moved))


def test_a_mitigation_that_wraps_the_optimizer_trains_through_the_examples_fit(split, trained):
    from infusion_audit.mitigations.clipping import Clip

    pipeline, _, checkpoints = trained
    clipped = Clip(max_grad_norm=1.0).retrain(pipeline.fit, pipeline.new_model, split.train, start=checkpoints[2],
                                              epochs=1)
    assert clipped.figures["steps"] == 19 and clipped.figures["clipped_fraction"] > 0  # 300 documents / 16
    plain = pipeline.continue_training(checkpoints[2], split.train)
    assert any(not torch.equal(a, b) for a, b in zip(parameters(clipped.model), parameters(plain)))


def test_each_document_is_augmented_by_its_own_seed_per_epoch(split):
    pipeline = pipeline_on(split)
    model = pipeline.new_model()
    seen: list[torch.Tensor] = []  # what the model is trained on, batch by batch
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
    pipeline.fit(model, split.train, until_epoch=2)
    per_epoch = torch.cat(seen).reshape(2, 300, 1, 8, 8)
    document = 11
    images = [per_epoch[e][np.flatnonzero(pipeline.order(split.train, e) == document)[0]] for e in range(2)]
    clean = torch.from_numpy(split.train.x[document])
    assert not torch.equal(images[0], clean) and not torch.equal(images[0], images[1])

    from digits_pipeline import augment

    for epoch, image in enumerate(images):  # the same (epoch, document) gives the same image
        seed = pipeline.document_seed(split.train, epoch)[document]
        assert torch.equal(augment(clean[None], [seed])[0], image)
    # the seed follows the document, not its slot: with document 0 removed, document 11 is the 11th
    without_first = pipeline.document_seed(split.train.without([0]), 1)
    assert without_first[document - 1] == pipeline.document_seed(split.train, 1)[document]


def test_bench_measures_infusion_on_the_users_pipeline_against_its_clean_control(tmp_path):
    run = infusion_audit.bench(small_config(), tmp_path / "run", progress=False, report=False)
    attacks = run.records["attack"]
    arms = sorted(r["attack"] for r in attacks)
    assert arms == ["infusion"] * 2 + ["probe-insertion"] * 2 + ["random-noise"] * 2
    for r in attacks:
        assert math.isfinite(r["delta_logodds"]) and 0 <= r["acc_control"] <= 1 and 0 <= r["acc_poisoned"] <= 1
        assert r["delta_logodds"] == pytest.approx(r["logodds_poisoned"] - r["logodds_control"])
    by_target: dict = {}  # every arm on a target is measured against the one clean control
    for r in attacks:
        by_target.setdefault(json.dumps(r["target"], sort_keys=True), set()).add(r["logodds_control"])
    assert len(by_target) == 2 and all(len(controls) == 1 for controls in by_target.values())
    assert {r["detector"] for r in run.records["detection"]} == {"loss-outlier"} and run.records["defence"]

    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    (training,) = provenance["training"].values()
    assert training["n_train"] == len(digits(test_fraction=0.5).train) and 0 < training["quality"]["value"] <= 1
    # the checkpoints were written by the example's own fit: only it stores its schedule's state
    (trained,) = (tmp_path / "run" / "artefacts").glob("train-*")
    assert Checkpoint.load(trained / "epoch-002.pt").meta["schedule"]["last_epoch"] == 2
    assert NAME in (tmp_path / "run" / "config.yaml").read_text()


def test_scan_with_the_example_config_trains_the_users_pipeline(tmp_path):
    save_npz(tmp_path / "suspect.npz", digits().train.subset(np.arange(300)))
    out = tmp_path / "scan"
    assert main(["-q", "scan", str(tmp_path / "suspect.npz"), "--config", str(CONFIG), "--out", str(out),
                 "--no-report"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["pipeline"] == NAME and summary["model"]["train_accuracy"] > 0.6  # 0.84 measured
    assert sorted(d["name"] for d in summary["detectors"]) == ["knn-label", "loss-outlier", "spectral-signature"]
    weights = Checkpoint.load(out / "model.pt").model  # the example's SmallCNN, not the built-in digits-cnn
    assert "classifier.weight" in weights and "head.weight" not in weights


def test_an_attack_crafted_on_the_builtin_model_is_measured_on_the_users_pipeline(tmp_path):
    from infusion_audit.config import from_sections, with_defaults
    from infusion_audit.protocol import Attacker, Victim

    pipeline = {k: v for k, v in small_config()["pipeline"].items() if k != "factory"}
    config = with_defaults(from_sections({"pipeline": pipeline, "attack": {"attacks": [{"name": "infusion"}],
                                                                            "targets": {"n": 1}}}, "<test>"))
    attacker = Attacker(config, tmp_path, progress=False)
    assert type(attacker.pipeline) is Pipeline  # the attacker's model: the built-in digits-cnn
    victim = Victim.train(replace(config.pipeline, factory=PluginSpec(NAME)), config.attack.protocol,
                          tmp_path / "victim", progress=False)
    assert type(victim.pipeline).__name__ == "AugmentedDigits"
    (target,) = attacker.targets()
    crafted = attacker.craft(config.attack.attacks[0], target, 0, config.attack.budget)
    on_attacker, _ = attacker.measure(crafted, attacker.victim)
    on_user, _ = attacker.measure(crafted, victim)
    for record in on_attacker, on_user:
        assert math.isfinite(record.delta_logodds) and record.poisoned_indices == on_attacker.poisoned_indices
    # measured on the user's model against the user's clean control, not on the attacker's
    assert on_user.acc_control == victim.control()["accuracy"]
    assert on_user.logodds_control != on_attacker.logodds_control


def test_the_readme_own_pipeline_snippets_run(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Audit your own pipeline"):]
    section = section[:section.index("\n## ", 1)]
    module, script = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert module.startswith("# my_pipeline.py\n")
    (tmp_path / "my_pipeline.py").write_text(module, encoding="utf-8")  # where the README says it lives
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, str(README), "exec"), namespace)
    run = namespace["run"]
    attacks = run.records["attack"]
    assert sorted(r["attack"] for r in attacks) == ["infusion", "infusion", "random-noise", "random-noise"]
    assert all(math.isfinite(r["delta_logodds"]) for r in attacks) and run.report.exists()
    assert {row["n"] for row in run.summaries["attacks"]} == {2}
    # trained by MyPipeline.fit: its nn.Sequential's weights, not the built-in digits-cnn's
    (trained,) = Path("runs/my-pipeline/artefacts").glob("train-*")
    assert set(Checkpoint.load(trained / "epoch-003.pt").model) == {"1.weight", "1.bias", "3.weight", "3.bias"}


def test_a_victims_entry_names_a_model_or_a_users_pipeline():
    from infusion_audit.grid import victim_pipeline

    config = from_dict(PipelineConfig, small_config()["pipeline"], "<test>", "pipeline")
    as_pipeline = victim_pipeline(config, PluginSpec(NAME))
    assert as_pipeline.factory.name == NAME and as_pipeline.model == config.model
    as_model = victim_pipeline(config, PluginSpec("digits-cnn"))  # the built-in recipe with that model
    assert as_model.factory is None and as_model.model.name == "digits-cnn"
