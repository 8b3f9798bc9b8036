import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from infusion_audit.config import PluginSpec, PipelineConfig, TrainConfig
from infusion_audit.data import digits
from infusion_audit.errors import DataError
from infusion_audit.models import DigitsCNN, SimpleCNN, TinyResNet, build_model, num_parameters
from infusion_audit.pipeline import Pipeline, train_pipeline
from infusion_audit.training import Checkpoint, accuracy, data_order, epoch_order


def test_paper_architectures():
    assert num_parameters(TinyResNet()) == 308_650
    assert 280_000 < num_parameters(SimpleCNN()) < 300_000
    x = torch.zeros(2, 3, 32, 32)
    for model in (TinyResNet(), SimpleCNN()):
        assert model(x).shape == (2, 10) and model.features(x).shape == (2, 128)
    assert DigitsCNN()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_removing_documents_keeps_the_order_of_the_rest():
    ds = digits().train.subset(range(40))
    cfg = TrainConfig(order="reshuffle", seed=1)
    removed = [3, 17, 30]
    smaller = ds.without(removed)
    full = epoch_order(ds, cfg, 2)
    kept_in_order = [i for i in full if i not in removed]
    # positions in the smaller set map back to the same documents, seen in the same relative order
    np.testing.assert_array_equal(smaller.parent_positions[1][epoch_order(smaller, cfg, 2)], kept_in_order)
    np.testing.assert_array_equal(smaller.x, np.delete(ds.x, removed, axis=0))


def test_data_order_fixed_or_reshuffled():
    fixed = TrainConfig(order="fixed", seed=3)
    np.testing.assert_array_equal(data_order(50, fixed, 0), data_order(50, fixed, 7))
    shuffled = TrainConfig(order="reshuffle", seed=3)
    assert not np.array_equal(data_order(50, shuffled, 0), data_order(50, shuffled, 1))
    np.testing.assert_array_equal(data_order(50, shuffled, 1), data_order(50, shuffled, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pipeline = Pipeline.from_config(PipelineConfig())
    return train_pipeline(pipeline, tmp_path_factory.mktemp("train"), progress=False)


def test_digits_cnn_reaches_95_percent(trained):
    assert trained.metrics["test"]["accuracy"] >= 0.95
    assert len(trained.checkpoints) == 11 and all(p.exists() for p in trained.checkpoints)
    assert trained.metrics["train_seconds"] < 60


def test_training_is_deterministic_and_continue_replays_the_same_epoch(trained):
    pipeline = trained.pipeline
    again = pipeline.continue_training(trained.checkpoint(9), pipeline.data.train, epochs=1)
    ref = trained.checkpoint(10).model
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0)


def test_resume_from_a_middle_checkpoint_matches(tmp_path, trained):
    pipeline = trained.pipeline
    out = tmp_path / "resume"
    first = train_pipeline(pipeline, out, progress=False)
    # simulate an interrupted run: drop the last epochs and the metrics, then resume
    for path in first.checkpoints[6:]:
        path.unlink()
    (first.checkpoints[0].parent / "metrics.json").unlink()
    resumed = train_pipeline(pipeline, out, progress=False)
    assert resumed.metrics["resumed_from_epoch"] == 5
    for name, value in resumed.checkpoint(10).model.items():
        torch.testing.assert_close(value, trained.checkpoint(10).model[name], rtol=0, atol=0)


def test_retrain_from_scratch_on_a_subset(trained):
    pipeline = trained.pipeline
    keep = np.arange(len(pipeline.data.train))[10:]
    model = pipeline.retrain_from_scratch(pipeline.data.train.subset(keep))
    assert accuracy(model, pipeline.data.test) > 0.9


def test_checkpoint_loading_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(DataError, match="not a loadable checkpoint"):
        Checkpoint.load(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="no 'model' entry"):
        Checkpoint.load(tmp_path / "other.pt")


def test_user_model_factory(tmp_path, monkeypatch):
    (tmp_path / "teammodel.py").write_text(
        "import torch\n"
        "def make(in_channels, num_classes, hidden=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 64, hidden),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(PluginSpec("teammodel:make", {"hidden": 5}), in_channels=1, num_classes=10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_train_command(tmp_path):
    (tmp_path / "c.yaml").write_text("pipeline: {train: {epochs: 2}}\n")
    proc = subprocess.run([sys.executable, "-m", "infusion_audit", "-q", "train", "c.yaml", "--out", "run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    assert (tmp_path / "run" / "config.yaml").exists()
    assert len(list((tmp_path / "run" / "artefacts").glob("train-*/epoch-*.pt"))) == 3


# --------------------------------------------------------------------------- the recipe's options
def _recipe(**train) -> Pipeline:
    """The digits pipeline on 200 documents, with recipe options (fast to retrain)."""
    from infusion_audit.config import from_dict
    from infusion_audit.data import DatasetSplit

    config = from_dict(PipelineConfig, {"train": {"epochs": 3, "batch_size": 32, **train}})
    split = digits()
    return Pipeline(config, DatasetSplit(split.train.subset(np.arange(200)), split.test))


AUGMENTED = {"augment": [{"name": "RandomAffine", "params": {"degrees": 10, "translate": [0.1, 0.1]}}],
             "schedule": {"name": "CosineAnnealingLR", "params": {"T_max": 3}}, "clip_grad_norm": 1.0}


def test_augmented_scheduled_retrains_are_bit_identical_and_differ_only_by_the_data():
    pipeline = _recipe(**AUGMENTED)
    model = pipeline.new_model()
    start = Checkpoint.capture(1, pipeline.fit(model, pipeline.data.train, until_epoch=1), None)
    a, b = (pipeline.fit(pipeline.new_model(), pipeline.data.train, start=start) for _ in range(2))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    train = pipeline.data.train
    edited = train.with_documents([5], np.clip(train.x[[5]] + 0.25, 0, 1))
    c = pipeline.fit(pipeline.new_model(), edited, start=start)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_augmentation_is_seeded_per_epoch_and_document_and_leaves_the_global_rng():
    from infusion_audit.training import augmentation

    cfg = _recipe(**AUGMENTED).config.train
    augment, x = augmentation(cfg), torch.rand(2, 1, 8, 8)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = augment(x, np.array([3, 4]), epoch=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(augment(x[[1]], np.array([4]), epoch=0), first[[1]], rtol=0, atol=0)  # same document
    assert not torch.equal(augment(x, np.array([3, 4]), epoch=1), first)  # the next epoch draws anew
    assert not torch.equal(first, x)


def test_schedule_gives_every_epoch_its_rate_and_bad_options_fail_in_one_line():
    from infusion_audit.config import from_dict
    from infusion_audit.errors import ConfigError
    from infusion_audit.training import epoch_lrs

    cosine = _recipe(lr=0.1, schedule={"name": "CosineAnnealingLR", "params": {"T_max": 2}}).config.train
    assert epoch_lrs(cosine) == pytest.approx([0.1, 0.05, 0.0], abs=1e-12)
    step = _recipe(lr=0.1, schedule={"name": "MultiStepLR", "params": {"milestones": [2]}}).config.train
    assert epoch_lrs(step) == pytest.approx([0.1, 0.1, 0.01])
    for bad, key in [({"schedule": {"name": "Nope"}}, "train.schedule.name"),
                     ({"augment": [{"name": "Nope"}]}, r"train.augment\[0\].name"),
                     ({"clip_grad_norm": 0}, "train.clip_grad_norm")]:
        with pytest.raises(ConfigError, match=key):
            from_dict(PipelineConfig, {"train": bad}, "<test>", "pipeline")
    with pytest.raises(ConfigError, match="pipeline.train.schedule"):
        epoch_lrs(_recipe(schedule={"name": "StepLR", "params": {"nope": 1}}).config.train)


def test_bf16_training_learns_as_fp32_does():
    from infusion_audit.config import from_dict

    accuracies = {}
    for precision in ("fp32", "bf16"):
        pipeline = Pipeline(from_dict(PipelineConfig, {"train": {"epochs": 3, "precision": precision}}))
        accuracies[precision] = accuracy(pipeline.fit(pipeline.new_model(), pipeline.data.train), pipeline.data.test)
    assert accuracies["fp32"] > 0.5 and abs(accuracies["bf16"] - accuracies["fp32"]) < 0.1, accuracies
