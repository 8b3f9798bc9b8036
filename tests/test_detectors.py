import numpy as np
import pytest
import torch

from infusion_audit.config import PipelineConfig
from infusion_audit.data import ImageDataset
from infusion_audit.behaviour import ClassBehaviour
from infusion_audit.detectors import AuditContext, Detector, build_detector, run_detector
from infusion_audit.detectors.perturbation import infer_grid
from infusion_audit.errors import DataError, PluginError
from infusion_audit.metrics import auroc
from infusion_audit.registry import DETECTORS
from infusion_audit.pipeline import Pipeline
from infusion_audit.training import train

EXPECTED = {"spectral-signature", "activation-clustering", "influence-outlier", "perturbation-norm", "knn-label",
            "loss-outlier"}


@pytest.fixture(scope="module")
def digits_flip():
    """Digits with 14 training labels flipped (1%), and a digits CNN trained on it (~5 s)."""
    pipeline = Pipeline.from_config(PipelineConfig())
    clean = pipeline.data.train
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(clean), 14, replace=False))
    poisoned = clean.with_documents(idx, clean.x[idx], (clean.y[idx] + rng.integers(1, 10, 14)) % 10)
    model = train(pipeline.new_model(), poisoned, pipeline.train_cfg, progress=False)
    truth = np.zeros(len(clean), dtype=bool)
    truth[idx] = True
    return {"pipeline": pipeline, "clean": clean, "poisoned": poisoned, "model": model, "truth": truth}


def _context(d, **kw):
    return AuditContext(d["poisoned"], model=d["model"], progress=False, **kw)


def _synthetic(features, labels, eps=0.05):
    """A context over precomputed features (as a text pipeline or a benchmark would hand them in)."""
    data = ImageDataset(np.zeros((len(labels), 1, 2, 2), np.float32), labels, num_classes=int(labels.max()) + 1)
    return AuditContext(data, expected_fraction=eps, progress=False).provide(features=features)


def test_all_detectors_are_registered_with_needs_and_knowledge():
    assert EXPECTED <= set(DETECTORS.names())
    for name in EXPECTED:
        det = build_detector(name)
        assert det.needs and det.knowledge in ("data", "model", "reference", "forensic")
    with pytest.raises(PluginError, match="bad params"):
        build_detector("knn-label", {"neighbours": 3})
    with pytest.raises(PluginError, match="criterion"):
        build_detector("activation-clustering", {"criterion": "biggest"})


def test_model_detectors_catch_label_flips_and_share_one_forward_pass(digits_flip, monkeypatch):
    d = digits_flip
    ctx = _context(d)
    calls = []
    original = type(d["model"]).features
    monkeypatch.setattr(type(d["model"]), "features", lambda self, x: calls.append(len(x)) or original(self, x))
    results = {}
    for name, params in [("loss-outlier", {}), ("loss-outlier", {"signal": "head-grad-norm"}), ("knn-label", {}),
                         ("spectral-signature", {}), ("activation-clustering", {})]:
        run = run_detector(build_detector(name, params), ctx)
        assert run.scores.shape == (len(ctx),) and run.flagged.dtype == bool
        results[(name, params.get("signal"))] = auroc(d["truth"], run.scores)
    assert sum(calls) == len(ctx)  # features computed once, shared by every detector
    assert results[("loss-outlier", None)] > 0.97
    assert results[("loss-outlier", "head-grad-norm")] > 0.97
    assert results[("knn-label", None)] > 0.95


def test_influence_outlier_self_and_forensic(digits_flip):
    d = digits_flip
    ctx = _context(d)
    self_run = run_detector(build_detector("influence-outlier", {"mode": "self"}), ctx)
    assert self_run.knowledge == "model"
    assert auroc(d["truth"], self_run.scores) > 0.95  # mislabelled documents have high self-influence
    # forensic sign check: 14 copies of a test image labelled t are the documents most helpful to x* -> t
    x_star = d["pipeline"].data.test.x[0]
    t = (int(d["pipeline"].data.test.y[0]) + 3) % 10
    idx = np.flatnonzero(~d["truth"])[::100][:14]
    inserted = d["clean"].with_documents(idx, np.repeat(x_star[None], len(idx), 0), np.full(len(idx), t))
    model = train(d["pipeline"].new_model(), inserted, d["pipeline"].train_cfg, progress=False)
    truth = np.zeros(len(inserted), dtype=bool)
    truth[idx] = True
    forensic = AuditContext(inserted, model=model, behaviour=ClassBehaviour(x_star, t), progress=False)
    run = run_detector(build_detector("influence-outlier"), forensic)
    assert run.knowledge == "forensic" and run.details["mode"] == "forensic"
    assert auroc(truth, run.scores) > 0.95
    assert auroc(truth, -run.scores) < 0.1  # the sign matters: most negative influence = most helpful


def test_missing_needs_are_skipped_with_what_would_enable_them(digits_flip):
    ctx = AuditContext(digits_flip["poisoned"], progress=False)
    run = run_detector(build_detector("spectral-signature"), ctx)
    assert run.scores is None and run.skipped == "needs a model trained on the suspect data"
    for caller, give in (("command line", "--model"), ("python", "pass model=")):  # said as each caller gives it
        ctx.caller = caller
        assert give in run_detector(build_detector("spectral-signature"), ctx).skipped
    with_model = _context(digits_flip)
    with_model.caller = "command line"
    run = run_detector(build_detector("influence-outlier", {"mode": "forensic"}), with_model)
    assert "--behaviour" in run.skipped
    assert run_detector(build_detector("perturbation-norm"), ctx).knowledge == "data"


def test_spectral_signature_centres_features_unlike_the_uncentred_variant():
    rng = np.random.default_rng(0)
    n, d = 400, 16
    feats = rng.normal(size=(n, d))
    feats[:, 0] += 20.0  # the class mean sits far out along the first axis
    poison = np.zeros(n, dtype=bool)
    poison[:12] = True
    feats[poison, 0] -= 6.0  # the poisons share a shift back towards the origin along that axis
    labels = np.zeros(n, dtype=np.int64)
    ctx = _synthetic(feats, labels, eps=0.03)
    centred = run_detector(build_detector("spectral-signature"), ctx)
    raw = run_detector(build_detector("spectral-signature", {"centre": False}), ctx)
    assert auroc(poison, centred.scores) > 0.99
    assert auroc(poison, raw.scores) < 0.05  # uncentred scores rank the poisons LAST
    assert centred.flagged.sum() == int(np.ceil(1.5 * 0.03 * n))
    assert centred.flagged[poison].all()


def test_activation_clustering_finds_a_small_cluster_and_leaves_a_clean_class_alone():
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(300, 32))
    planted = rng.normal(size=(300, 32))
    planted[:20] += 8.0  # a small, well separated cluster inside class 1
    feats = np.concatenate([clean, planted])
    labels = np.repeat([0, 1], 300)
    poison = np.zeros(600, dtype=bool)
    poison[300:320] = True
    run = run_detector(build_detector("activation-clustering"), _synthetic(feats, labels))
    assert run.details["classes"][1]["poisoned"] and not run.details["classes"][0]["poisoned"]
    np.testing.assert_array_equal(run.flagged, poison)
    assert auroc(poison, run.scores) == 1.0


def test_knn_label_flags_documents_whose_neighbours_disagree():
    rng = np.random.default_rng(2)
    centres = np.eye(3) * 10
    labels = np.repeat([0, 1, 2], 100)
    feats = centres[labels] + rng.normal(size=(300, 3))
    flipped = labels.copy()
    flipped[[5, 105, 205]] = [1, 2, 0]
    run = run_detector(build_detector("knn-label", {"k": 7}), _synthetic(feats, flipped, eps=0.01))
    assert set(np.flatnonzero(run.flagged)) == {5, 105, 205}
    assert run.scores[[5, 105, 205]].min() == 1.0 and run.details["k"] == 7


def test_perturbation_norm_with_reference_ranks_relabels_first():
    rng = np.random.default_rng(3)
    x = np.round(rng.uniform(size=(50, 1, 4, 4)) * 16) / 16
    ref = ImageDataset(x, np.arange(50) % 5, num_classes=5)
    moved = x.copy()
    moved[3, 0, 0, 0] += 1 / 16
    moved[7] = np.clip(moved[7] + 1 / 16, 0, 1)
    y = ref.y.copy()
    y[9] = (y[9] + 1) % 5
    ctx = AuditContext(ImageDataset(moved, y, num_classes=5), reference=ref, progress=False)
    run = run_detector(build_detector("perturbation-norm"), ctx)
    assert run.knowledge == "reference"
    assert set(np.flatnonzero(run.flagged)) == {3, 7, 9}
    assert list(np.argsort(-run.scores)[:3]) == [9, 7, 3]
    with pytest.raises(DataError, match="reference shape"):
        AuditContext(ImageDataset(moved[:10], y[:10], num_classes=5), reference=ref)


def test_perturbation_norm_without_reference_sees_format_violations(digits_flip):
    data = digits_flip["clean"]
    assert infer_grid(data.x) == 1 / 16
    x = data.x.copy()
    x[10, 0, 3, 3] = 0.51  # off the 1/16 grid
    x[20, 0, 0, 0] = 1 + 1 / 16  # on the grid but outside [0, 1]
    float_file = ImageDataset(x, data.y, num_classes=10, grid=None)  # a float npz: the grid is inferred
    run = run_detector(build_detector("perturbation-norm"), AuditContext(float_file, progress=False))
    assert run.details["grid"] == 1 / 16 and run.details["off_grid"] == 1 and run.details["out_of_range"] == 1
    assert set(np.argsort(-run.scores)[:2]) == {10, 20}
    assert run.flagged[[10, 20]].all()


def test_perturbation_norm_sees_high_frequency_noise_on_smooth_images():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:16, 0:16] / 15
    phases = rng.uniform(0, 2 * np.pi, size=(200, 1, 1))
    smooth = 0.5 + 0.4 * np.sin(2 * xx[None] + phases) * np.cos(3 * yy[None] + phases)
    x = np.round(smooth[:, None] * 255) / 255
    noisy = [17, 101]
    x[noisy] = np.clip(x[noisy] + rng.choice([-3, 3], size=(2, 1, 16, 16)) / 255, 0, 1)  # on grid, in range
    data = ImageDataset(x, np.arange(200) % 2, num_classes=2, grid=1 / 255)
    run = run_detector(build_detector("perturbation-norm"), AuditContext(data, progress=False))
    assert run.details["off_grid"] == 0 and run.details["out_of_range"] == 0
    assert set(np.argsort(-run.scores)[:2]) == set(noisy)
    assert run.flagged[noisy].all() and run.flagged.sum() == 2


def test_context_provided_features_without_a_model():
    rng = np.random.default_rng(5)
    ctx = _synthetic(rng.normal(size=(60, 4)), np.arange(60) % 2)
    assert ctx.has("model") and not ctx.has("gradients")
    assert run_detector(build_detector("spectral-signature"), ctx).scores.shape == (60,)
    assert "needs" in run_detector(build_detector("influence-outlier", {"mode": "self"}), ctx).skipped
    with pytest.raises(DataError, match="rows"):
        ctx.provide(losses=np.zeros(3))


# --------------------------------------------------------------------------- cross-check with ART
def _art_classifier(dim, n_classes):
    from art.estimators.classification import PyTorchClassifier

    # The identity network: ART reads its "activations" straight from the features we hand it.
    return PyTorchClassifier(model=torch.nn.Sequential(torch.nn.Identity()), loss=torch.nn.CrossEntropyLoss(),
                             input_shape=(dim,), nb_classes=n_classes)


def _jaccard(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def _art_activation_flags(feats, labels, n_classes, seed):
    from art.defences.detector.poison import ActivationDefence

    np.random.seed(seed)  # ART's KMeans has no seed of its own and runs one initialisation
    _, is_clean = ActivationDefence(_art_classifier(feats.shape[1], n_classes), feats,
                                    np.eye(n_classes)[labels]).detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA",
                                                                             cluster_analysis="smaller")
    return np.asarray(is_clean) == 0


def test_agrees_with_art_on_the_same_features(digits_flip, capsys):
    """Configured like ART (uncentred spectral scores; smaller cluster of every class), we flag what ART flags.

    On a trained model's features, 2-means on a unimodal class is unstable, so ART disagrees with
    itself across seeds; ours must agree with ART about as well as ART agrees with itself. On
    features with a real planted cluster, the two must flag the same documents."""
    pytest.importorskip("art")
    from art.defences.detector.poison import SpectralSignatureDefense

    ctx = _context(digits_flip)
    feats, y = ctx.features(), ctx.labels
    _, is_clean = SpectralSignatureDefense(_art_classifier(feats.shape[1], 10), feats, np.eye(10)[y],
                                           expected_pp_poison=0.01, eps_multiplier=1.5).detect_poison()
    art_ss = np.asarray(is_clean) == 0
    ours_ss = run_detector(build_detector("spectral-signature", {"centre": False}), ctx).flagged
    ss_overlap = _jaccard(art_ss, ours_ss)

    ours_ac = run_detector(build_detector("activation-clustering", {"criterion": "smaller"}), ctx).flagged
    art_runs = [_art_activation_flags(feats, y, 10, seed) for seed in range(3)]
    ours_vs_art = np.mean([_jaccard(ours_ac, a) for a in art_runs])
    art_vs_art = np.mean([_jaccard(a, b) for i, a in enumerate(art_runs) for b in art_runs[i + 1:]])

    rng = np.random.default_rng(6)
    planted = rng.normal(size=(600, 32))
    planted[np.arange(600) % 10 == 0] += 6.0  # 10% of each class in a separate cluster
    labels = np.arange(600) % 2
    ours_planted = run_detector(build_detector("activation-clustering", {"criterion": "smaller"}),
                                _synthetic(planted, labels)).flagged
    planted_overlap = _jaccard(ours_planted, _art_activation_flags(planted, labels, 2, 0))
    with capsys.disabled():
        print(f"\nART agreement (Jaccard of flagged sets): spectral-signature {ss_overlap:.3f} "
              f"({ours_ss.sum()} vs {art_ss.sum()} flagged); activation-clustering on digits features: "
              f"ours vs ART {ours_vs_art:.3f}, ART vs ART across seeds {art_vs_art:.3f}; "
              f"on a planted cluster {planted_overlap:.3f}")
    assert ss_overlap >= 0.85
    assert ours_vs_art >= art_vs_art - 0.05
    assert planted_overlap >= 0.95


def test_a_failing_or_inapplicable_detector_is_reported_not_raised():
    class Broken(Detector):
        def score(self, context):
            raise RuntimeError("boom")

    ctx = _synthetic(np.zeros((10, 2)), np.arange(10) % 2)
    broken = Broken()
    run = run_detector(broken, ctx)
    assert run.scores is None and run.skipped == "failed: RuntimeError: boom"

    class TextLike:
        kind = "text"

        def __len__(self):
            return 10

    run = run_detector(build_detector("perturbation-norm"), AuditContext(TextLike(), progress=False))
    assert run.skipped == "scores image data, not text data"
