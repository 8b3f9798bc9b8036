"""Every detector on models users bring as they are: an nn.Sequential, torchvision's ResNet-18, a conv head.

The models come from a user's own module (written to a temporary folder and put on sys.path), as
``package.module:callable`` names them in a config; none of them has ``features()`` or ``head``.
"""

import json
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

from infusion_audit import bench, scan
from infusion_audit.cli import main
from infusion_audit.config import PluginSpec, TrainConfig
from infusion_audit.data import ImageDataset, save_npz
from infusion_audit.detectors import FeatureExtractor
from infusion_audit.errors import ConfigError
from infusion_audit.io import read_jsonl
from infusion_audit.training import Checkpoint, train

IMAGE_DETECTORS = {"activation-clustering", "influence-outlier", "knn-label", "loss-outlier", "perturbation-norm",
                   "spectral-signature"}
FEATURE_DETECTORS = {"activation-clustering", "knn-label", "spectral-signature"}

USER_MODELS = '''
from torch import nn
from torchvision.models import resnet18


def mlp(in_channels=1, num_classes=10, side=8, hidden=32):
    """The issue's model: a plain nn.Sequential, Flatten-Linear-ReLU-Linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def resnet(in_channels=3, num_classes=10):
    return resnet18(num_classes=num_classes)


class ConvHead(nn.Module):
    """Ends in a 1x1 convolution and a global average pool: there is no nn.Linear at all."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.classifier = nn.Sequential(nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(self.body(x))
'''


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """The user's module `mymodels`, importable as a config names it."""
    root = tmp_path_factory.mktemp("user")
    (root / "mymodels.py").write_text(USER_MODELS)
    sys.path.insert(0, str(root))
    import mymodels

    yield mymodels
    sys.path.remove(str(root))
    sys.modules.pop("mymodels", None)


def _images(channels: int, side: int, n: int = 64, flips: int = 4, seed: int = 0):
    """n images of 10 classes (a coarse colour pattern per class plus noise, on the 8-bit grid) with `flips`
    labels flipped; returns the dataset and the flipped positions."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    patterns = rng.uniform(0, 1, (10, channels, 4, 4)).repeat(side // 4, 2).repeat(side // 4, 3)
    x = np.round(np.clip(patterns[y] + rng.normal(0, 0.1, (n, channels, side, side)), 0, 1) * 255) / 255
    flipped = np.sort(rng.choice(n, flips, replace=False))
    y[flipped] = (y[flipped] + 1 + rng.integers(0, 9, flips)) % 10
    return ImageDataset(x.astype(np.float32), y, num_classes=10, grid=1 / 255), flipped


def _trained(factory, data: ImageDataset) -> nn.Module:
    torch.manual_seed(0)
    model = factory(in_channels=data.input_shape[0], num_classes=10)
    return train(model, data, TrainConfig(lr=0.05, batch_size=16, epochs=3, seed=0), progress=False).eval()


def _check_every_detector_ran(result, expected_skips: dict[str, str] | None = None):
    """Every image detector ran with finite scores, except those in `expected_skips` (name -> words of the reason)."""
    expected_skips = expected_skips or {}
    assert {r.name for r in result.runs} == IMAGE_DETECTORS
    for run in result.runs:
        if run.name in expected_skips:
            assert run.skipped is not None and expected_skips[run.name] in run.skipped, (run.name, run.skipped)
            continue
        assert run.skipped is None, (run.name, run.skipped)
        assert run.scores.shape == (len(result.context),) and np.isfinite(run.scores).all()
        assert np.isfinite(result.detection[run.name]["auroc"]["value"])


@pytest.mark.parametrize("name, channels, side, layer, source", [
    ("mlp", 1, 8, None, "the input of the last nn.Linear '3'"),
    ("resnet", 3, 32, None, "the input of the last nn.Linear 'fc'"),
    ("ConvHead", 3, 32, "body", "the output of 'body'"),
])
def test_every_detector_runs_on_a_users_model(user_models, name, channels, side, layer, source):
    data, flipped = _images(channels, side)
    model = _trained(getattr(user_models, name), data)
    result = scan(data, model=model, truth=flipped, bootstrap=0, progress=False, features_layer=layer)
    assert result.context.extractor.source == source
    # ResNet-18's 11.2M parameters x 640 probe behaviours (twice: raw, preconditioned) are 53.3 GiB: probe mode says so
    _check_every_detector_ran(result, {"influence-outlier": "mode 'probe' would hold 640 probe gradients"}
                              if name == "resnet" else None)
    assert result.context.features().shape[1] == {"mlp": 32, "resnet": 512, "ConvHead": 8 * 8 * 8}[name]


def test_features_are_the_penultimate_layer(user_models):
    """The hook's features are what the classifier reads: torchvision's own extractor agrees on ResNet-18,
    and the Sequential's first three modules give the MLP's."""
    from torchvision.models.feature_extraction import create_feature_extractor

    data, _ = _images(3, 32, n=8)
    x = torch.from_numpy(data.x)
    resnet = user_models.resnet().eval()
    with torch.no_grad():
        features, logits = FeatureExtractor(resnet)(x)
        reference = create_feature_extractor(resnet, {"flatten": "h"})(x)["h"]
        torch.testing.assert_close(features, reference)
        torch.testing.assert_close(logits, resnet(x))
        mlp = user_models.mlp(in_channels=3, side=32).eval()
        torch.testing.assert_close(FeatureExtractor(mlp)(x)[0], mlp[:3](x))


def test_a_model_without_linear_head_runs_what_it_can_and_says_what_enables_the_rest(user_models):
    data, flipped = _images(3, 32)
    model = _trained(user_models.ConvHead, data)
    result = scan(data, model=model, truth=flipped, bootstrap=0, progress=False)
    why = "ConvHead has no nn.Linear whose input they are; name the penultimate module with scan.features_layer"
    _check_every_detector_ran(result, dict.fromkeys(FEATURE_DETECTORS, why))  # the loss needs the logits only
    head = scan(data, model=model, detectors=[PluginSpec("loss-outlier", {"signal": "head-grad-norm"})],
                progress=False)
    assert why in head.runs[0].skipped
    with pytest.raises(ConfigError, match="scan.features_layer: expected a module of ConvHead.*'head'"):
        scan(data, model=model, features_layer="head", progress=False)


def test_text_features_are_the_final_hidden_state():
    """On a language model the hook takes what its head reads: the final hidden state transformers reports."""
    from infusion_audit.text.models import tiny_gpt_neo

    torch.manual_seed(0)
    model = tiny_gpt_neo(vocab_size=20, max_length=12).eval()
    ids = torch.randint(0, 20, (3, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden, logits = FeatureExtractor(model)(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-1])
    torch.testing.assert_close(logits, out.logits)


def test_scan_cli_with_a_users_model_checkpoint_and_layer(user_models, tmp_path, capsys):
    data, flipped = _images(3, 32)
    save_npz(tmp_path / "suspect.npz", data)
    Checkpoint.capture(3, _trained(user_models.ConvHead, data), None).save(tmp_path / "model.pt")
    (tmp_path / "scan.yaml").write_text("pipeline:\n  model: {name: 'mymodels:ConvHead'}\n"
                                        "scan:\n  features_layer: body\n  bootstrap: 0\n")
    out = tmp_path / "scan"
    assert main(["-q", "scan", str(tmp_path / "suspect.npz"), "--config", str(tmp_path / "scan.yaml"),
                 "--model", str(tmp_path / "model.pt"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [] and {d["name"] for d in summary["detectors"]} == IMAGE_DETECTORS
    assert summary["model"]["source"] == "checkpoint"
    assert "skipped" not in capsys.readouterr().out


BENCH = """
pipeline:
  dataset: {name: digits}
  model: {name: "mymodels:%s"}
  train: {lr: 0.05, batch_size: 16, epochs: 5, seed: 0}
attack:
  attacks: [{name: label-flip}]
  targets: {n: 2, seed: 0}
budgets: [{k: 0.01}]
scan: {bootstrap: 0}
defence: {enabled: false}
"""


def _bench(tmp_path, model: str) -> tuple[list[dict], str]:
    (tmp_path / "bench.yaml").write_text(BENCH % model)
    result = bench(tmp_path / "bench.yaml", tmp_path / "run", progress=False)
    return read_jsonl(tmp_path / "run" / "results.jsonl"), result.report.read_text(encoding="utf-8")


def test_bench_on_a_users_sequential_runs_every_image_detector(user_models, tmp_path):
    records, html = _bench(tmp_path, "mlp")
    cells = {r["cell"] for r in records if r["kind"] == "attack"}
    detections = [r for r in records if r["kind"] == "detection"]
    assert len(cells) == 2 and not [r for r in records if r["kind"] == "skip"]
    assert {r["detector"] for r in detections} == IMAGE_DETECTORS and len(detections) == 2 * len(IMAGE_DETECTORS)
    assert all(np.isfinite(r["auroc"]["value"]) for r in detections)
    assert 'id="not-run"' not in html


def test_bench_says_why_a_detector_did_not_run_once_per_run(user_models, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        records, html = _bench(tmp_path, "ConvHead")
    skips = [r for r in records if r["kind"] == "skip"]
    assert sorted(r["detector"] for r in skips) == sorted([*FEATURE_DETECTORS] * 2)  # recorded per cell
    said = [m for m in caplog.messages if "not run" in m]
    assert len(said) == len(FEATURE_DETECTORS)  # logged once per run
    assert all("scan.features_layer" in m for m in said)
    assert 'id="not-run"' in html and "in 2 of 2 runs" in html and "scan.features_layer" in html
