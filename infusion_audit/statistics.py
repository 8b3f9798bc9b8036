"""Honest numbers: every rate and mean with n and a 95% confidence interval; paired tests between arms."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _st


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean with a Student-t confidence interval (None bounds when n < 2)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = float(v.std(ddof=1))
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def positive_mean_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 1000) -> dict:
    """Mean of a positive quantity (wall time) with a percentile-bootstrap CI, which stays within the values'
    range: a t-interval of skewed timings (one slow first run) runs below zero, e.g. 3.78 [-44.28, 51.85]."""
    out = mean_ci(values, level)
    if out["n"] >= 2:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
        ci = bootstrap_ci(np.mean, v, n_boot=n_boot, level=level)
        out.update(lo=ci["lo"], hi=ci["hi"])
    return out


def wilson(successes: int, n: int, level: float = 0.95) -> dict:
    """A proportion with its Wilson score interval (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return {"rate": None, "lo": None, "hi": None, "n": 0, "k": 0}
    z = float(_st.norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"rate": p, "lo": max(0.0, centre - half), "hi": min(1.0, centre + half), "n": n, "k": int(successes)}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Compare two arms on the same targets: mean difference a-b with CI, Wilcoxon signed-rank and paired t p-values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arms differ in length: {a.shape} vs {b.shape}")
    d = a - b
    out = {"diff": mean_ci(d), "n": len(d), "wins": int((d > 0).sum()), "p_wilcoxon": None, "p_ttest": None}
    if len(d) >= 2 and np.any(d != 0):
        out["p_wilcoxon"] = float(_st.wilcoxon(d, zero_method="zsplit").pvalue)
        out["p_ttest"] = float(_st.ttest_rel(a, b).pvalue) if d.std() > 0 else 0.0
    return out


def bootstrap_ci(statistic: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, strata: np.ndarray | None = None) -> dict:
    """Percentile bootstrap of `statistic(*arrays)` resampling rows; `strata` resamples within groups
    (e.g. poisons and clean documents separately, so every resample still has both)."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    point = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    samples = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        value = statistic(*(a[idx] for a in arrays))
        if value is not None and math.isfinite(value):
            samples.append(value)
    if not samples:
        return {"value": point, "lo": None, "hi": None, "n": n}
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return {"value": point, "lo": float(lo), "hi": float(hi), "n": n}


def fmt_ci(summary: dict, key: str = "mean", digits: int = 3) -> str:
    """'0.123 [0.100, 0.146] (n=30)' for tables and logs."""
    value = summary.get(key, summary.get("value", summary.get("rate")))
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if summary.get("lo") is not None:
        text += f" [{summary['lo']:.{digits}f}, {summary['hi']:.{digits}f}]"
    return text + f" (n={summary['n']})"
