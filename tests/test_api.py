"""The Python API: `scan` on arrays, torch Datasets and the project's datasets with any nn.Module, `bench` on a
dict config, their results, and the README's "From Python" snippets."""

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import infusion_audit
from infusion_audit import ConfigError, DataError, UserError
from infusion_audit.data import ImageDataset, digits

README = Path(__file__).resolve().parents[1] / "README.md"
DETECTORS = ["loss-outlier", "knn-label", "influence-outlier"]


@pytest.fixture(scope="module")
def flipped():
    """600 digits as (N, 8, 8) floats with 12 labels flipped, and a plain nn.Sequential trained on them."""
    split = digits()
    x, y = split.train.x[:600, 0].copy(), split.train.y[:600].copy()
    rng = np.random.default_rng(0)
    poisoned = np.sort(rng.choice(len(y), 12, replace=False))
    y[poisoned] = (y[poisoned] + rng.integers(1, 10, len(poisoned))) % 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, labels = torch.from_numpy(x)[:, None], torch.from_numpy(y)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return {"x": x, "y": y, "poisoned": poisoned, "model": model.eval()}


@pytest.fixture(scope="module")
def result(flipped):
    return infusion_audit.scan(flipped["x"], flipped["y"], model=flipped["model"], detectors=DETECTORS,
                               truth=flipped["poisoned"], bootstrap=20, progress=False)


class Pairs(torch.utils.data.Dataset):
    """A map-style dataset of (CHW tensor, int) pairs, as torchvision's with ToTensor() returns them."""

    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x)[:, None], y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class PILPairs(Pairs):
    """(greyscale PIL image, int) pairs, as torchvision's datasets without a transform return them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(self.x[i]), int(self.y[i])


def test_scan_arrays_with_a_plain_module_ranks_the_flipped_labels_first(result, flipped):
    n = len(flipped["y"])
    assert set(result.scores) == set(DETECTORS) and result.skipped == {}
    for name in DETECTORS:
        assert result.scores[name].shape == (n,) and np.isfinite(result.scores[name]).all()
        assert result.ranks[name].min() == 1 and result.flagged[name].dtype == bool
    top = result.suspects(12, detector="loss-outlier")
    assert len(top) == 12 and result.ranks["loss-outlier"][top[0]] == 1
    assert len(set(top) & set(flipped["poisoned"])) >= 7  # 9 measured, chance 0.24: a flipped label is hard to fit
    assert result.detection["loss-outlier"]["auroc"]["value"] > 0.95
    everyone = result.suspects(None)
    assert sorted(everyone) == list(range(n))  # all documents, best rank over detectors first
    best = np.min([result.ranks[d] for d in DETECTORS], axis=0)
    assert list(best[everyone]) == sorted(best)


def test_scan_result_csv_report_and_notebook_summary(result, flipped, tmp_path):
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert len(rows) == len(flipped["y"]) and rows[5]["label"] == str(flipped["y"][5])
    assert float(rows[7]["loss-outlier_score"]) == pytest.approx(result.scores["loss-outlier"][7], rel=1e-5)
    assert sorted(int(r["index"]) for r in rows if r["poisoned"] == "1") == list(flipped["poisoned"])
    assert result.to_csv(tmp_path / "scores.csv").read_text() == result.to_csv()
    page = result.write_report(tmp_path / "scan.html").read_text(encoding="utf-8")
    assert "Dataset scan: data arrays" in page and "loss-outlier" in page and "<script" not in page
    summary = result._repr_html_()
    assert summary.startswith("<div>") and f"Scan of {len(flipped['y'])} documents" in summary
    assert summary.count("<tr>") == 1 + len(DETECTORS) + 1 + 10  # detectors table, then the top 10 suspects
    assert "<script" not in summary


def test_channels_last_uint8_torch_dataset_and_project_dataset_give_the_same_scores(result, flipped):
    x, y, model = flipped["x"], flipped["y"], flipped["model"]
    expected = result.scores["loss-outlier"]
    as_uint8 = (x * 255).round().astype(np.uint8)  # digits hold multiples of 1/16; uint8 is scaled by 1/255
    rescaled = infusion_audit.scan(as_uint8[..., None], y, model=model, detectors=["loss-outlier"], progress=False)
    uint8_ref = infusion_audit.scan(as_uint8[:, None], torch.from_numpy(y), model=model, detectors=["loss-outlier"],
                                    progress=False)
    assert np.array_equal(rescaled.scores["loss-outlier"], uint8_ref.scores["loss-outlier"])  # NHWC == NCHW
    from_pil = infusion_audit.scan(PILPairs(as_uint8, y), model=model, detectors=["loss-outlier"], progress=False)
    assert np.array_equal(from_pil.scores["loss-outlier"], uint8_ref.scores["loss-outlier"])
    for data in (Pairs(x, y), ImageDataset(x[:, None], y, num_classes=10)):
        again = infusion_audit.scan(data, model=model, detectors="loss-outlier", progress=False)
        assert np.allclose(again.scores["loss-outlier"], expected)


def test_without_a_model_the_model_detectors_are_skipped_with_the_reason(flipped):
    out = infusion_audit.scan(flipped["x"], flipped["y"], detectors=["loss-outlier", "perturbation-norm"],
                              reference=flipped["x"], progress=False)
    assert list(out.scores) == ["perturbation-norm"] and list(out.skipped) == ["loss-outlier"]
    assert "model" in out.skipped["loss-outlier"]
    assert np.all(out.scores["perturbation-norm"] == 0)  # the reference is the data itself: nothing edited
    assert "loss-outlier" in out._repr_html_()


def test_text_dataset_with_a_reference_and_a_language_model():
    from dataclasses import replace

    from infusion_audit.registry import DATASETS
    from infusion_audit.text.models import tiny_gpt_neo

    clean = DATASETS.get("caesar")(n_train=40, n_test=4).train
    ids = clean.ids.copy()
    ids[[3, 17], 1] = (ids[[3, 17], 1] + 1) % clean.vocab.size
    suspect = replace(clean, ids=ids)
    out = infusion_audit.scan(suspect, reference=clean, progress=False)
    assert list(out.scores) == ["token-diff"] and "token-surprisal" in out.skipped
    assert sorted(out.suspects(2)) == [3, 17]
    torch.manual_seed(0)
    model = tiny_gpt_neo(clean.vocab.size, clean.max_length, hidden=16, layers=1, heads=2)
    out = infusion_audit.scan(suspect, model=model, detectors=["token-surprisal", "loss-outlier"], progress=False)
    assert out.skipped == {} and all(s.shape == (40,) and np.isfinite(s).all() for s in out.scores.values())


def _hostile_dataset(x, y):
    return ImageDataset(x[:, None], y, num_classes=10, name="<script>alert(1)</script>")


def test_everything_a_dataset_names_is_escaped_in_the_notebook_summary(flipped):
    out = infusion_audit.scan(_hostile_dataset(flipped["x"], flipped["y"]), detectors=["perturbation-norm"],
                              progress=False)
    page = out._repr_html_()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


class NotPairs(Pairs):
    def __getitem__(self, i):
        return self.x[i]


class Ragged(Pairs):
    def __getitem__(self, i):
        return (self.x[i] if i else self.x[i][:, :4]), int(self.y[i])


@pytest.mark.parametrize("call, error, words", [
    (lambda f: infusion_audit.scan(np.zeros((10, 3, 5, 3)), np.zeros(10, int)), DataError, "channels_last"),
    (lambda f: infusion_audit.scan(np.zeros((10, 8, 8, 8)), np.zeros(10, int)), DataError, "channels_last"),
    (lambda f: infusion_audit.scan(np.full((10, 8, 8), np.nan), np.zeros(10, int)), DataError, "NaN"),
    (lambda f: infusion_audit.scan(np.zeros((10, 8, 8)), np.full(10, 0.5)), DataError, "integers"),
    (lambda f: infusion_audit.scan(np.zeros((10, 8, 8)), np.zeros(9, int)), DataError, "labels"),
    (lambda f: infusion_audit.scan(np.zeros((10, 8, 8), dtype=np.int64), np.zeros(10, int)), DataError, "uint8"),
    (lambda f: infusion_audit.scan(np.zeros((1, 8, 8)), np.zeros(1, int)), DataError, "at least 2"),
    (lambda f: infusion_audit.scan(np.zeros((10, 8, 8))), UserError, "labels"),
    (lambda f: infusion_audit.scan([[1, 2]], [0]), UserError, "expected image arrays"),
    (lambda f: infusion_audit.scan(NotPairs(f["x"], f["y"])), DataError, "(input, label) pair"),
    (lambda f: infusion_audit.scan(Ragged(f["x"], f["y"])), DataError, "item 0"),
    (lambda f: infusion_audit.scan(f["x"], f["y"], model=nn.Linear(3, 10)), DataError, "cannot take"),
    (lambda f: infusion_audit.scan(f["x"], f["y"], model=nn.Sequential(nn.Flatten(), nn.Linear(64, 3))), DataError, "logits"),
    (lambda f: infusion_audit.scan(f["x"], f["y"], model="model.pt"), UserError, "nn.Module"),
    (lambda f: infusion_audit.scan(f["x"], f["y"], detectors=["no-such-detector"]), UserError, "no-such-detector"),
    (lambda f: infusion_audit.scan(f["x"], f["y"], behaviour=(f["x"][0], 12)), DataError, "class 12"),
    (lambda f: infusion_audit.scan(f["x"], f["y"], num_classes=3), DataError, "0..2"),
])
def test_what_scan_cannot_use_is_one_line_naming_the_problem(flipped, call, error, words):
    with pytest.raises(error) as caught:
        call(flipped)
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_bench_from_a_dict_with_a_model_factory_of_ones_own(tmp_path, monkeypatch):
    (tmp_path / "mymodels_api.py").write_text(
        "from torch import nn\n\n\ndef mlp(in_channels=1, num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, 32), nn.ReLU(), nn.Linear(32, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"pipeline": {"dataset": {"name": "digits"}, "model": {"name": "mymodels_api:mlp"},
                           "train": {"epochs": 3}},
              "attack": {"attacks": [{"name": "label-flip"}, {"name": "probe-insertion", "params": {"copies": 1}}],
                         "targets": {"n": 2, "seed": 0}},
              "scan": {"detectors": [{"name": "loss-outlier"}], "bootstrap": 20}}
    run = infusion_audit.bench(config, tmp_path / "run", progress=False, report=False)
    assert run.report is None and not (tmp_path / "run" / "report.html").exists()
    attacks = run.records["attack"]
    assert sorted(r["attack"] for r in attacks) == ["label-flip", "label-flip", "probe-insertion", "probe-insertion"]
    assert {r["detector"] for r in run.records["detection"]} == {"loss-outlier"}
    assert len(run.records["defence"]) == 4
    rows = {row["label"]: row for row in run.summaries["attacks"]}
    assert set(rows) == {"label-flip", "probe-insertion (x1)"}
    flips = [r["delta_logodds"] for r in attacks if r["attack"] == "label-flip"]
    assert rows["label-flip"]["n"] == 2 and rows["label-flip"]["delta_logodds"]["mean"] == pytest.approx(np.mean(flips))
    assert [d["detector"] for d in run.summaries["detection"]] == ["loss-outlier"] * 2
    assert "mymodels_api:mlp" in (tmp_path / "run" / "config.yaml").read_text()
    page = run.write_report(tmp_path / "page.html")
    assert page == tmp_path / "page.html" and "Verdict" in page.read_text(encoding="utf-8")


@pytest.mark.parametrize("config, key", [
    ({"attack": {"atacks": []}}, "<dict>: attack.atacks"),
    ({"pipeline": {"train": {"epochs": 0}}}, "<dict>: pipeline.train.epochs"),
    ({"scan": {"detectors": [{"name": "nope"}]}}, "<dict>: scan.detectors[0].name"),
    ({"report": {}}, "<dict>: report"),
])
def test_a_dict_config_is_checked_like_a_yaml_file(config, key, tmp_path):
    with pytest.raises(ConfigError) as caught:
        infusion_audit.bench(config, tmp_path / "run", progress=False)
    assert str(caught.value).startswith(key)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_bench_refuses_what_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="a mapping of sections, a YAML path, a built-in name or an AuditConfig"):
        infusion_audit.bench(42, tmp_path / "run")


def test_the_readme_from_python_snippets_run(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    section = section[:section.index("\n## ", 1)]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    result, flipped = namespace["result"], namespace["flipped"]
    assert len(set(result.suspects(20)) & set(flipped)) >= 12  # 14 measured; chance gives 0.2
    assert (tmp_path / "scores.csv").exists() and (tmp_path / "scan.html").exists()
    run = namespace["run"]
    assert len(run.records["attack"]) == 2 and run.report == Path("runs/python-bench/report.html")
    assert run.report.exists() and run.summaries["attacks"][0]["n"] == 2
