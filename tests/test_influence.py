"""The influence engine against ground truths: explicit gradients, a dense Gauss-Newton solve,
kronfluence's own scores, finite differences, and an actual retrain."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from infusion_audit.behaviour import ClassBehaviour, measurement, measurement_gradient
from infusion_audit.data import digits
from infusion_audit.influence import (flatten, influence_scores, input_gradient, loss_gradient, make_ihvp,
                                      per_example_gradients, trainable_parameters)
from infusion_audit.models import DigitsCNN


@pytest.fixture(scope="module")
def split():
    return digits()


def f64_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x.double()), y)


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()


def test_per_example_gradients_match_one_by_one(split):
    torch.manual_seed(0)
    model = DigitsCNN()
    idx = np.array([0, 5, 17, 300])
    grads = per_example_gradients(model, split.train, idx, batch_size=3)
    for row, i in zip(grads, idx):
        torch.testing.assert_close(row, loss_gradient(model, split.train.batch([i])), rtol=1e-4, atol=1e-6)


def test_per_example_gradients_take_any_batch_and_loss():
    """A dict batch and a custom mean loss (how a language model's dataset and loss plug in)."""

    class Docs:
        def __init__(self):
            self.a = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))

        def __len__(self):
            return len(self.a)

        def batch(self, idx, device="cpu"):
            return {"a": self.a[np.asarray(idx)].to(device)}

    def loss(model, batch):
        return (model(batch["a"]) ** 2).mean()

    torch.manual_seed(0)
    model, docs = nn.Linear(4, 3), Docs()
    grads = per_example_gradients(model, docs, loss_fn=loss)
    params = list(model.parameters())
    for i in range(len(docs)):
        expected = flatten(torch.autograd.grad(loss(model, docs.batch([i])), params))
        torch.testing.assert_close(grads[i], expected)


def test_exact_ihvp_solves_the_damped_gauss_newton_system(split):
    """CG against a dense solve of (G + damping I) built from explicit Jacobians."""
    train = split.train.subset(np.arange(200))
    model, damping = linear_model(), 1e-2
    solver = make_ihvp("exact", model, train, damping, loss_fn=f64_loss, tol=1e-8)
    params = trainable_parameters(model)
    x, _ = train.batch(np.arange(len(train)))
    jac = jacrev(lambda p: functional_call(model, p, (x.double(),)))(dict(params))
    J = torch.cat([j.reshape(len(x), 10, -1) for j in jac.values()], dim=2)  # (n, 10, P)
    with torch.no_grad():
        p = torch.softmax(model(x.double()), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / len(x)
    v = torch.randn(G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.solve(G + damping * torch.eye(len(G), dtype=G.dtype), v)
    got = solver.solve(v)
    assert solver.info["residual"][-1] < 1e-7
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_ekfac_ihvp_reproduces_kronfluence_scores(split, tmp_path):
    """Our application of kronfluence's factors, dotted with training gradients, equals the pairwise
    scores kronfluence computes itself: the module, weight and bias layout is right."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from infusion_audit.influence.ihvp import _IndexDataset

    train = split.train.subset(np.arange(96))
    torch.manual_seed(0)
    model, damping = DigitsCNN().eval(), 1e-3
    solver = make_ihvp("ekfac", model, train, damping, cache_dir=tmp_path, batch_size=32)
    query = 5
    v = solver.solve(loss_gradient(model, train.batch([query])))
    ours = influence_scores(model, train, v)

    analyzer = Analyzer(solver.analysis_name, prepare_model(copy.deepcopy(model), solver.task), solver.task,
                        cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    collate = DataLoaderKwargs(collate_fn=lambda idx: train.batch(np.asarray(idx)))
    analyzer.compute_pairwise_scores("scores", "factors", _IndexDataset(len(train)), _IndexDataset(len(train)),
                                     per_device_query_batch_size=1, per_device_train_batch_size=32,
                                     query_indices=[query], dataloader_kwargs=collate,
                                     score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"][0].double().numpy()
    assert np.corrcoef(ours, theirs)[0, 1] > 0.9999
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    # cached factors are reused, not refitted
    again = make_ihvp("ekfac", model, train, damping, cache_dir=tmp_path, batch_size=32)
    assert again.info["cached"] and not solver.info["cached"]


def test_input_gradient_matches_finite_differences(split):
    torch.manual_seed(0)
    model = DigitsCNN().double().eval()
    x, y = split.train.batch([3, 8])
    x = x.double()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    n = 100
    g = input_gradient(model, x, y, v, n, loss_fn=f64_loss)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def surrogate(h):  # -(1/n) sum_j <grad_theta L(x_j + h d_j), v>
        return -float(v @ loss_gradient(model, (x + h * direction, y), f64_loss) * len(x)) / n

    h = 1e-5
    numeric = (surrogate(h) - surrogate(-h)) / (2 * h)
    assert numeric == pytest.approx(float((g * direction).sum()), rel=1e-4)


def _fit(model, train, weights, wd):
    """Full-batch L-BFGS to convergence on sum_i w_i L_i / n + wd/2 |theta|^2."""
    x, y = train.batch(np.arange(len(train)))
    x, w = x.double(), torch.as_tensor(weights, dtype=torch.float64)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(model(x), y, reduction="none") * w).sum() / len(x)
        loss = loss + wd / 2 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model


def test_sign_convention_confirmed_by_retraining(split):
    """Up-weighting the most negative-score document raises f, the most positive lowers it, by about
    -eps * s_i (logistic regression with weight decay: the damped Gauss-Newton matrix is its Hessian)."""
    train, wd = split.train.subset(np.arange(300)), 1e-2
    model = _fit(linear_model(), train, np.ones(len(train)), wd)
    x_star, t = split.test.batch([0])[0][0].double(), 3
    solver = make_ihvp("exact", model, train, wd, loss_fn=f64_loss, tol=1e-10)
    s = influence_scores(model, train, solver.solve(measurement_gradient(model, ClassBehaviour(x_star.numpy(), t))), loss_fn=f64_loss)
    f0 = float(measurement(model, x_star, t).detach())
    extra = 3.0  # three more copies of the document: eps = 3 / n
    for i in (int(np.argmin(s)), int(np.argmax(s))):
        weights = np.ones(len(train))
        weights[i] += extra
        refit = _fit(copy.deepcopy(model), train, weights, wd)
        actual = float(measurement(refit, x_star, t).detach()) - f0
        predicted = -extra / len(train) * s[i]
        assert np.sign(actual) == np.sign(predicted)
        assert actual == pytest.approx(predicted, rel=0.3)


def test_ekfac_approximates_the_exact_ihvp_on_the_digits_cnn(tmp_path):
    """The comparison the README reports, shrunk: a trained digits CNN, 200 documents as the curvature
    set, one target. EK-FAC points the same way as the exact solve and picks overlapping documents."""
    from infusion_audit.behaviour import sample_targets
    from infusion_audit.config import PipelineConfig
    from infusion_audit.influence.compare import compare_ihvps
    from infusion_audit.pipeline import Pipeline, train_pipeline

    pipeline = Pipeline.from_config(PipelineConfig())
    model = train_pipeline(pipeline, tmp_path, progress=False).model()
    train = pipeline.data.train.subset(np.arange(200))
    targets = sample_targets(pipeline.data.test, 1, seed=0)
    queries = [measurement_gradient(model, pipeline.behaviour(t)) for t in targets]
    rows = compare_ihvps(model, train, queries, make_ihvp("exact", model, train, 1e-2, tol=1e-4),
                         make_ihvp("ekfac", model, train, 1e-2), top=10)
    for r in rows:
        assert r["exact_residual"] < 1e-3
        assert r["cosine"] > 0.5 and r["spearman"] > 0.1 and r["top_overlap"] > 0
