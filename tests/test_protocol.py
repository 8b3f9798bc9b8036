"""The attack protocol end to end through the `attack` command: records against a clean control,
resumability, the printed table, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from infusion_audit.cli import main
from infusion_audit.bench import audit, prepare
from infusion_audit.config import BUILTIN_CONFIGS, from_sections, load_config
from infusion_audit.data import read_manifest
from infusion_audit.errors import ConfigError
from infusion_audit.io import read_jsonl
from infusion_audit.results import format_table, load_records, summarise

SMALL = {
    "attack": {
        "attacks": [{"name": "infusion", "params": {"steps": 10}}, {"name": "random-noise"},
                    {"name": "infusion", "params": {"preset": "influence", "steps": 10}},
                    {"name": "probe-insertion", "params": {"copies": 1}},
                    {"name": "random-noise", "params": {"like": "infusion"}}],
        "targets": {"n": 3, "seed": 0},
        "budget": {"k": 0.01, "eps": 0.125, "norm": "linf", "quantize": True},
    }
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg_path = out / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    assert main(["-q", "attack", str(cfg_path), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("variant, accuracy_cost", [("quantized,steps=10", None),
                                                    ("quantized,influence,steps=10", 0.01)])
def test_infusion_beats_its_clean_control(small_run, variant, accuracy_cost):
    """Fixed seed, digits, k = 1%, two grey levels on the grid (the margin keeps the test robust): under the
    default (unrolled) preset and the influence one, every target's p(t) rises against the clean control, by more
    than random noise on the influence recipe's documents does, and the influence recipe keeps accuracy (the
    unrolled default buys its larger effect with accuracy, 11 points on one of these targets: README reports
    it, and `keep_accuracy` trades it back)."""
    records = read_jsonl(small_run / "results.jsonl")
    inf = [r for r in records if r["attack"] == "infusion" and r["variant"] == variant]
    noise = {r["target"]["index"]: r for r in records if r["attack"] == "random-noise" and r["variant"] == "quantized"}
    assert len(inf) == 3
    assert np.mean([r["delta_logodds"] for r in inf]) > 0.5
    for r in inf:
        assert r["delta_p"] > 0
        assert r["delta_logodds"] > noise[r["target"]["index"]]["delta_logodds"]
        assert accuracy_cost is None or abs(r["acc_poisoned"] - r["acc_control"]) <= accuracy_cost
        assert r["norms"]["off_grid"] == 0 and r["norms"]["linf"] == pytest.approx(1 / 8)
        # the protocol's control (epoch 9 + one clean epoch) is the trained model itself: deterministic
        assert r["p_control"] == pytest.approx(r["p_before"], rel=1e-5, abs=1e-12)


def test_records_follow_the_shared_schema(small_run):
    # cells finish in whatever order the workers end them: take Infusion's record, not the first
    r = next(r for r in read_jsonl(small_run / "results.jsonl") if r["attack"] == "infusion")
    for key in ("kind", "cell", "dataset", "attack", "variant", "budget", "target", "seed", "p_before",
                "p_control", "p_poisoned", "delta_p", "logodds_control", "logodds_poisoned", "delta_logodds",
                "top1_control", "top1_poisoned", "flip", "acc_control", "acc_poisoned", "norms",
                "poisoned_indices", "artefact", "timings"):
        assert key in r, key
    assert r["kind"] == "attack" and set(r["budget"]) == {"k", "eps", "norm", "quantize"}
    assert set(r["target"]) == {"index", "true", "class"}
    manifest = read_manifest(small_run / r["artefact"])
    assert manifest["poisoned_indices"] == r["poisoned_indices"]
    assert {"pgd", "retrain", "select"} <= set(r["timings"])
    assert yaml.safe_load((small_run / "config.yaml").read_text())["attack"]["targets"]["n"] == 3


def test_rerun_resumes_without_recomputing(small_run, capsys):
    before = (small_run / "results.jsonl").read_text()
    assert main(["-q", "attack", str(small_run / "small.yaml"), "--out", str(small_run)]) == 0
    assert (small_run / "results.jsonl").read_text() == before
    out = capsys.readouterr().out
    assert "infusion (quantized,steps=10)" in out and "Wilcoxon" in out


def test_summary_pairs_arms_on_the_same_targets(small_run):
    summary = summarise(load_records(small_run))
    rows = {row["label"]: row for row in summary["attacks"]}
    arm = "infusion (quantized,steps=10)"
    infusion = rows[arm]
    assert infusion["n"] == 3 and infusion["budget"] == "k=14, L∞ ε=0.125"
    assert infusion["success"]["rate"] == 1.0 and infusion["success_p"]["rate"] == 1.0
    versus = {c["versus"]: c for c in summary["comparisons"] if c["arm"] == arm}
    assert set(versus) == {"random-noise (quantized)", "random-noise (quantized,like infusion)",
                           "probe-insertion (x1)", "infusion (quantized,influence,steps=10)"}
    assert versus["random-noise (quantized)"]["n"] == 3 and versus["random-noise (quantized)"]["wins"] == 3
    table = format_table(summary)
    assert f"{arm} " in table and f"{arm}, k=14, L∞ ε=0.125 vs random-noise" in table


def test_noise_like_an_arm_edits_its_documents_and_stands_beside_it(small_run):
    """`random-noise` with `like: infusion` perturbs exactly the documents the first Infusion arm (the default)
    edited for the same target, and the summary pairs each Infusion arm with the control on its own documents:
    the default with it, the influence recipe with the plain control on its most-negative documents."""
    records = read_jsonl(small_run / "results.jsonl")
    by = lambda attack, variant: {r["target"]["index"]: r for r in records  # noqa: E731
                                  if r["attack"] == attack and r["variant"] == variant}
    default, like = by("infusion", "quantized,steps=10"), by("random-noise", "quantized,like infusion")
    plain, influence = by("random-noise", "quantized"), by("infusion", "quantized,influence,steps=10")
    assert len(like) == 3 and like.keys() == default.keys()
    for t, r in like.items():
        assert r["poisoned_indices"] == default[t]["poisoned_indices"] != plain[t]["poisoned_indices"]
        assert r["norms"]["linf"] == pytest.approx(1 / 8) and r["params"]["like"] == "infusion"
        assert default[t]["delta_logodds"] > r["delta_logodds"]
    assert all(plain[t]["poisoned_indices"] == influence[t]["poisoned_indices"] for t in plain)
    rows = {row["label"]: row for row in summarise(load_records(small_run))["attacks"]}
    assert rows["infusion (quantized,steps=10)"]["control"]["label"] == "random-noise (quantized,like infusion)"
    assert rows["infusion (quantized,influence,steps=10)"]["control"]["label"] == "random-noise (quantized)"
    assert rows["infusion (quantized,steps=10)"]["control"]["wins"] == 3


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="attack.budget.k"):
        from_sections({"attack": {"budget": {"k": 0}}})
    with pytest.raises(ConfigError, match=r"attack.attacks\[0\].name"):
        from_sections({"attack": {"attacks": [{"name": "nope"}]}})
    with pytest.raises(ConfigError, match="influence.backend"):
        from_sections({"attack": {"influence": {"backend": "lissa"}}})


def test_builtin_digits_config_is_the_done_when_setting():
    cfg = load_config("digits")
    assert cfg.attack.targets.n >= 30 and cfg.attack.budget.k == 0.01 and cfg.attack.budget.quantize
    assert cfg.attack.budget.eps == 1 / 16
    names = [(a.name, a.params) for a in cfg.attack.attacks]
    assert ("infusion", {"quantize": False}) in names and ("probe-insertion", {"copies": 1}) in names


def test_cifar10_paper_config_plumbing(cifar10_root, tmp_path):
    """The paper's config on a tiny CIFAR-format fixture, shrunk to run in seconds on the CPU."""
    data = yaml.safe_load((BUILTIN_CONFIGS / "cifar10-paper.yaml").read_text())
    assert data["influence"]["damping"] == 1.0e-8 and data["attack"]["budget"]["k"] == 100
    data["pipeline"]["dataset"]["params"].update(root=str(cifar10_root), validation=12)
    data["pipeline"]["train"].update(device="cpu", epochs=2)
    data["pipeline"]["quality_floor"] = 0.0  # random fixture images: there is nothing to learn
    data["attack"].update(targets={"n": 2, "seed": 0}, budget={**data["attack"]["budget"], "k": 4})
    data["attack"]["attacks"][0]["params"]["steps"] = 3
    cfg = prepare(data)
    records = audit(cfg, tmp_path, progress=False, detect=False).records["attack"]
    assert len(records) == 2 * len(cfg.attack.attacks)
    inf = [r for r in records if r["attack"] == "infusion"]
    assert all(r["budget"]["k"] == 4 and 0 < r["norms"]["linf"] <= 0.05 + 1e-6 for r in inf)
    assert all(np.isfinite(r["delta_p"]) for r in records)
    manifest = json.loads((tmp_path / inf[0]["artefact"] / "manifest.json").read_text())
    assert manifest["data"] == "poisoned.npz"
