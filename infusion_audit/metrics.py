"""Detection metrics against ground truth, each with a stratified bootstrap CI.

Ranking quality (AUROC, AUPRC, TPR at a fixed low FPR, recall in the top k = number of poisons)
says how well the scores separate poisons from clean documents; the flag rule's precision and
recall say what a defender who trusts the rule actually removes. Bootstrap resamples poisons and
clean documents separately (stratified), so every resample holds both.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from .statistics import bootstrap_ci

ROC_POINTS = 50


def auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Probability a random poison outscores a random clean document (ties count half)."""
    truth = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: mean precision at each poison's rank (ties resolved pessimistically)."""
    truth = np.asarray(truth, dtype=bool)
    n_pos = int(truth.sum())
    if n_pos == 0:
        return float("nan")
    order = np.lexsort((truth, -np.asarray(scores)))  # within tied scores, clean documents first
    hits = truth[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].sum() / n_pos)


def tpr_at_fpr(truth: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Share of poisons scoring strictly above the threshold that lets through at most `fpr` of clean documents.
    An `fpr` that is itself a share of these clean documents (another detector's operating point) allows exactly
    that many, float rounding of the product aside."""
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    clean = np.sort(scores[~truth])[::-1]
    if truth.sum() == 0 or len(clean) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(clean) + 1e-9))
    threshold = clean[allowed] if allowed < len(clean) else -np.inf
    return float((scores[truth] > threshold).mean())


def recall_at_k(truth: np.ndarray, scores: np.ndarray, k: int | None = None) -> float:
    """Share of poisons among the k highest scores (k = number of poisons); ties at the cut share the slots."""
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(truth.sum())
    k = n_pos if k is None else k
    if n_pos == 0 or k <= 0:
        return float("nan")
    cut = np.sort(scores)[::-1][min(k, len(scores)) - 1]
    above = scores > cut
    at = scores == cut
    slots = k - int(above.sum())
    found = (truth & above).sum() + slots * (truth & at).sum() / max(1, int(at.sum()))
    return float(found / n_pos)


def flag_precision(truth: np.ndarray, flagged: np.ndarray) -> float:
    truth, flagged = np.asarray(truth, dtype=bool), np.asarray(flagged, dtype=bool)
    return float((truth & flagged).sum() / flagged.sum()) if flagged.any() else float("nan")


def flag_recall(truth: np.ndarray, flagged: np.ndarray) -> float:
    truth, flagged = np.asarray(truth, dtype=bool), np.asarray(flagged, dtype=bool)
    return float((truth & flagged).sum() / truth.sum()) if truth.any() else float("nan")


def roc_points(truth: np.ndarray, scores: np.ndarray, max_points: int = ROC_POINTS) -> dict:
    """The ROC curve thinned to at most `max_points` points (always keeping (0,0) and (1,1))."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(truth, dtype=bool), np.asarray(scores, dtype=np.float64))
    if len(fpr) > max_points:
        keep = np.unique(np.round(np.linspace(0, len(fpr) - 1, max_points)).astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def _ci(statistic, truth: np.ndarray, *arrays: np.ndarray, n_boot: int, seed: int) -> dict:
    out = bootstrap_ci(statistic, truth, *arrays, n_boot=n_boot, seed=seed, strata=truth)
    if out["value"] is not None and not np.isfinite(out["value"]):
        out["value"] = None
    return out


def detection_metrics(truth: np.ndarray, scores: np.ndarray, flagged: np.ndarray | None = None,
                      labels: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """The 'detection' record fields of the shared results schema (without the cell and detector keys).

    `labels` adds per-class AUROC for the classes that hold poisons (label-flip poisons sit in
    their new class; a class-conditional detector is judged within that class).
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.shape != scores.shape:
        raise ValueError(f"ground truth has shape {truth.shape}, scores {scores.shape}")
    kw = dict(n_boot=n_boot, seed=seed)
    record = {
        "n": int(len(truth)),
        "n_poison": int(truth.sum()),
        "auroc": _ci(auroc, truth, scores, **kw),
        "auprc": _ci(auprc, truth, scores, **kw),
        "tpr_at_1fpr": _ci(lambda t, s: tpr_at_fpr(t, s, 0.01), truth, scores, **kw),
        "tpr_at_5fpr": _ci(lambda t, s: tpr_at_fpr(t, s, 0.05), truth, scores, **kw),
        "recall_at_k": _ci(lambda t, s: recall_at_k(t, s, int(truth.sum())), truth, scores, **kw),
        "roc": roc_points(truth, scores) if 0 < truth.sum() < len(truth) else {"fpr": [], "tpr": []},
    }
    if flagged is not None:
        flagged = np.asarray(flagged, dtype=bool)
        record["flagged"] = int(flagged.sum())
        record["flag_precision"] = _nan_to_none(flag_precision(truth, flagged))
        record["flag_recall"] = _nan_to_none(flag_recall(truth, flagged))
        record["flag_precision_ci"] = _ci(flag_precision, truth, flagged, **kw)
        record["flag_recall_ci"] = _ci(flag_recall, truth, flagged, **kw)
    if labels is not None:
        labels = np.asarray(labels)
        record["per_class"] = {
            str(int(c)): {"n": int((labels == c).sum()), "n_poison": int((truth & (labels == c)).sum()),
                          "auroc": _nan_to_none(auroc(truth[labels == c], scores[labels == c]))}
            for c in np.unique(labels[truth])}
    return record


def _nan_to_none(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)
