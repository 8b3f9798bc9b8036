import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from infusion_audit.metrics import (auprc, auroc, detection_metrics, flag_precision, flag_recall, recall_at_k,
                                    roc_points, tpr_at_fpr)


def _case(n=400, n_pos=20, separation=1.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(n, dtype=bool)
    truth[rng.choice(n, n_pos, replace=False)] = True
    scores = rng.normal(size=n) + separation * truth
    return truth, scores


def test_ranking_metrics_agree_with_sklearn_without_ties():
    truth, scores = _case()
    assert auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert auprc(truth, scores) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


def test_perfect_reversed_and_constant_scores():
    truth = np.array([0, 0, 0, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    perfect = truth.astype(float)
    for fn in (auroc, auprc, lambda t, s: recall_at_k(t, s), lambda t, s: tpr_at_fpr(t, s, 0.01)):
        assert fn(truth, perfect) == 1.0
    assert auroc(truth, -perfect) == 0.0
    assert recall_at_k(truth, -perfect) == 0.0
    assert tpr_at_fpr(truth, -perfect, 0.05) == 0.0
    flat = np.zeros(len(truth))
    assert auroc(truth, flat) == 0.5  # ties count half
    assert recall_at_k(truth, flat) == pytest.approx(2 / 10)  # two slots shared among ten tied documents
    assert tpr_at_fpr(truth, flat, 0.2) == 0.0  # a tied threshold admits no poison without admitting all clean
    assert auprc(truth, flat) == pytest.approx((1 / 9 + 2 / 10) / 2)  # ties resolved pessimistically


def test_tpr_at_fpr_respects_the_false_positive_budget():
    truth, scores = _case(n=1000, n_pos=50, separation=2.0, seed=1)
    for fpr in (0.01, 0.05, 0.2):
        tpr = tpr_at_fpr(truth, scores, fpr)
        threshold = np.sort(scores[~truth])[::-1][int(np.floor(fpr * (~truth).sum()))]
        assert (scores[~truth] > threshold).mean() <= fpr
        assert tpr == pytest.approx((scores[truth] > threshold).mean())
    assert tpr_at_fpr(truth, scores, 0.01) <= tpr_at_fpr(truth, scores, 0.05) <= tpr_at_fpr(truth, scores, 0.2)


def test_flag_precision_recall():
    truth = np.array([1, 1, 0, 0, 0], dtype=bool)
    flagged = np.array([1, 0, 1, 1, 0], dtype=bool)
    assert flag_precision(truth, flagged) == pytest.approx(1 / 3)
    assert flag_recall(truth, flagged) == pytest.approx(1 / 2)
    assert np.isnan(flag_precision(truth, np.zeros(5, dtype=bool)))


def test_detection_record_has_the_schema_fields_and_honest_cis():
    truth, scores = _case(n=600, n_pos=30, separation=1.5, seed=2)
    flagged = scores > np.quantile(scores, 0.95)
    labels = np.arange(600) % 3
    rec = detection_metrics(truth, scores, flagged, labels=labels, n_boot=200)
    for key in ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "recall_at_k"):
        block = rec[key]
        assert set(block) == {"value", "lo", "hi", "n"} and block["n"] == 600
        assert block["lo"] <= block["value"] <= block["hi"]
    assert rec["n"] == 600 and rec["n_poison"] == 30 and rec["flagged"] == int(flagged.sum())
    assert abs(rec["auroc"]["value"] - 0.856) < 0.08  # separation 1.5 sd: AUROC = Phi(1.5/sqrt 2)
    assert rec["auroc"]["hi"] - rec["auroc"]["lo"] > 0.02
    assert rec["flag_recall"] == pytest.approx(flag_recall(truth, flagged))
    assert set(rec["per_class"]) == {str(c) for c in np.unique(labels[truth])}
    assert len(rec["roc"]["fpr"]) <= 50 and rec["roc"]["fpr"][0] == 0 and rec["roc"]["tpr"][-1] == 1
    null = detection_metrics(*_case(n=600, n_pos=30, separation=0.0, seed=3), n_boot=200)
    assert null["auroc"]["lo"] < 0.5 < null["auroc"]["hi"]


def test_roc_points_thin_long_curves():
    truth, scores = _case(n=5000, n_pos=200, seed=4)
    pts = roc_points(truth, scores)
    assert len(pts["fpr"]) <= 50
    assert np.all(np.diff(pts["fpr"]) >= 0) and np.all(np.diff(pts["tpr"]) >= 0)
