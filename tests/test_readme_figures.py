"""README's measured tables are written by benchmarks/figures.py from the runs its commands make: the tables
in README.md equal what the script renders from benchmarks/results/figures.json, and the rendering states
each figure over training seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _figures_module():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_the_scripts_rendering_of_the_measured_runs():
    figures = _figures_module()
    measured = json.loads(figures.FIGURES.read_text())
    text = figures.README.read_text(encoding="utf-8")
    markers = figures.MARKER.findall(text)
    assert markers, "README.md has no table written by benchmarks/figures.py"
    assert {m[1] for m in markers} <= set(measured)
    assert figures.render_readme(text, measured) == text, "run `python benchmarks/figures.py render`"
    for experiment in {m[1] for m in markers}:
        assert len(measured[experiment]["seeds"]) >= 3, f"{experiment}: README gives figures over 3 seeds"


def _attack(mean: float, status: str = "succeeds") -> dict:
    return {"label": "infusion (quantized)", "budget": "k=14", "n": 10, "status": status,
            "delta_logodds": {"mean": mean, "lo": mean - 0.5, "hi": mean + 0.5}, "delta_p": 0.001,
            "success": [10, 10], "flip": [0, 10], "acc_drop": 0.001}


def test_a_table_gives_the_mean_over_seeds_with_a_prediction_interval_and_counts_the_seeds_a_conclusion_holds_on():
    figures = _figures_module()
    seeds = {0: {"attacks": [_attack(1.0)]}, 1: {"attacks": [_attack(2.0)]},
             2: {"attacks": [_attack(0.3, "no effect shown")]}}
    row = figures.attacks_table(seeds).splitlines()[2]
    # mean, the 95% prediction interval of one more run (1.10 ± 4.303 · 0.8544 · sqrt(4/3)), the seeds' range
    assert "| 1.10 [-3.14, 5.34] (seeds 0.30 to 2.00) |" in row and "| 2/3 seeds |" in row and "| 30/30 |" in row
    text = "before\n<!-- figures:x:attacks -->\nstale\n<!-- /figures -->\nafter\n"
    rendered = figures.render_readme(text, {"x": {"seeds": {str(k): v for k, v in seeds.items()}}})
    assert "stale" not in rendered and "(seeds 0.30 to 2.00)" in rendered and rendered.endswith("after\n")
