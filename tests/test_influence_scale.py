"""Influence at scale: layer-wise products and LoGra projections against full per-example gradients,
the projected IHVP, and the detector's scale paths against its full-gradient path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from infusion_audit.behaviour import ClassBehaviour
from infusion_audit.config import TrainConfig, load_config
from infusion_audit.data import ImageDataset, digits
from infusion_audit.detectors import AuditContext, build_detector, run_detector
from infusion_audit.errors import ConfigError
from infusion_audit.influence import LayerGradients, ProjectedIHVP, make_ihvp, per_example_gradients
from infusion_audit.models import DigitsCNN, TinyResNet
from infusion_audit.training import train


class SmallResNetLike(nn.Module):
    """Conv with bias, conv without, BatchNorm, a Linear applied to every position, and a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.mix = nn.Linear(5, 4)
        self.head = nn.Linear(4 * 9, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))  # (B, 5, 3, 3)
        h = torch.relu(self.mix(h.flatten(2).transpose(1, 2)))  # (B, 9, 4): a Linear over positions
        return self.head(h.flatten(1))


@pytest.fixture(scope="module")
def split():
    return digits()


@pytest.fixture(scope="module")
def trained(split):
    """DigitsCNN trained with the default digits recipe: influence rankings mean something."""
    torch.manual_seed(0)
    model = DigitsCNN()
    train(model, split.train, TrainConfig(lr=0.05, batch_size=16, epochs=10), progress=False)
    return model.eval(), split.train, split.test


@pytest.fixture(scope="module")
def ekfac(tmp_path_factory):
    """Where EK-FAC's factors are cached, so that they are fitted once for the module."""
    return tmp_path_factory.mktemp("factors")


@pytest.mark.parametrize("rank", [2, 4, 1000])
def test_projected_rows_equal_the_projection_of_per_example_gradients(split, rank):
    torch.manual_seed(0)
    model = SmallResNetLike().eval()
    model.bn.running_mean.uniform_(-0.2, 0.2)
    data = split.train.subset(np.arange(12))
    layers = LayerGradients(model, rank=rank, seed=3)
    full = per_example_gradients(model, data)
    rows = layers.gradients(data, batch_size=5)
    assert rows.shape == (12, layers.dim)
    torch.testing.assert_close(rows, layers.project(full), rtol=1e-4, atol=1e-6)
    if rank == 1000:  # nothing to save: every layer kept exactly, so the rows hold the gradients themselves
        assert layers.dim == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bn"))


def test_products_are_exact_on_the_tracked_layers(split):
    torch.manual_seed(0)
    model = SmallResNetLike().eval()
    data = split.train.subset(np.arange(10))
    layers = LayerGradients(model)
    full = per_example_gradients(model, data).double()
    vectors = torch.randn(3, full.shape[1], dtype=torch.float64)
    assert not layers.covers(vectors)  # BatchNorm entries: products would leave them out
    names = [n for n, p in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offset = 0
    for name, size in zip(names, sizes):
        if name.startswith("bn"):
            vectors[:, offset:offset + size] = 0
        offset += size
    assert layers.covers(vectors)
    got = layers.products(data.batch(np.arange(10)), vectors)
    torch.testing.assert_close(got, full @ vectors.T, rtol=1e-4, atol=1e-6)


def test_projection_is_seeded(split):
    model = DigitsCNN()
    a, b, c = LayerGradients(model, seed=0), LayerGradients(model, seed=0), LayerGradients(model, seed=1)
    assert all(torch.equal(x.p_in, y.p_in) for x, y in zip(a.layers, b.layers))
    assert not all(torch.equal(x.p_in, y.p_in) for x, y in zip(a.layers, c.layers) if len(x.p_in) < x.p_in.shape[1])


def test_projected_ihvp_solves_the_damped_system():
    torch.manual_seed(0)
    a = torch.randn(40, 12, dtype=torch.float64)
    fisher = a.T @ a / 40
    ihvp = ProjectedIHVP(nn.Linear(1, 1), fisher, damping="auto")
    assert ihvp.damping == pytest.approx(0.1 * float(torch.linalg.eigvalsh(fisher).mean()))
    v = torch.randn(3, 12, dtype=torch.float64)
    x = ihvp.solve_many(v)
    torch.testing.assert_close((fisher + ihvp.damping * torch.eye(12, dtype=torch.float64)) @ x.T, v.T)


def test_forensic_scores_without_per_document_gradients_equal_the_cached_path(trained, ekfac):
    """Gradients too large to keep: forensic influence is applied layer by layer, with the same scores."""
    model, data, test = trained
    behaviour = ClassBehaviour(test.x[3], (int(test.y[3]) + 1) % 10)
    scores = []
    for cache in (1 << 30, 0):
        context = AuditContext(data, model=model, behaviour=behaviour, progress=False, gradient_cache_bytes=cache,
                               factors_dir=ekfac)
        scores.append(run_detector(build_detector("influence-outlier", {"mode": "forensic"}), context).scores)
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-3, atol=1e-4 * np.abs(scores[0]).max())


def test_projected_self_influence_agrees_with_full_gradient_ekfac(trained, ekfac):
    """On the trained digits model (1,438 documents, 832 projected dimensions); 0.998 when measured."""
    model, data, _ = trained
    scores = {}
    for name, influence in (("full", {}), ("projected", {"backend": "projected", "rank": 16})):
        context = AuditContext(data, model=model, progress=False, influence=influence, factors_dir=ekfac)
        run = run_detector(build_detector("influence-outlier", {"mode": "self"}), context)
        assert run.skipped is None
        scores[name] = run.scores
    assert spearmanr(scores["full"], scores["projected"])[0] > 0.9


def test_projected_backend_runs_every_mode_from_one_pass(trained):
    model, data, test = trained
    context = AuditContext(data, model=model, behaviour=ClassBehaviour(test.x[0], 1), probe=test.subset(np.arange(5)),
                           progress=False, influence={"backend": "projected", "rank": 8, "damping": 1e-3})
    for mode in ("self", "probe", "forensic"):
        run = run_detector(build_detector("influence-outlier", {"mode": mode}), context)
        assert run.skipped is None and np.isfinite(run.scores).all(), mode
        assert run.details["ihvp"] == "projected"
    assert list(context.timings).count("projected") == 1


@pytest.mark.parametrize("influence, message", [
    ({"backend": "lissa"}, "backend: expected one of 'ekfac', 'exact', 'projected', got 'lissa'"),
    ({"backend": "projected", "rnk": 8}, r"rnk: expected no such key \(known: backend, damping, fit_size, rank, seed\)"),
    ({"backend": "ekfac", "rank": 8}, r"rank: expected a count >= 1, with backend projected, got 8"),
])
def test_bad_influence_settings_are_one_line_errors(influence, message):
    """The same settings, the same one-line error, from Python and from a config file."""
    data = ImageDataset(np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 0, 1]), num_classes=2)
    with pytest.raises(ConfigError, match="influence: " + message):
        AuditContext(data, influence=influence)
    with pytest.raises(ConfigError, match="<dict>: influence." + message):
        load_config({"influence": influence})


def test_projected_rank_must_be_positive():
    from infusion_audit.errors import UserError

    with pytest.raises(UserError, match="positive integer"):
        LayerGradients(TinyResNet(), rank=0)


def test_ekfac_fit_size_fits_on_a_sample(trained, ekfac):
    model, data, _ = trained
    context = AuditContext(data, model=model, progress=False,
                           influence={"backend": "ekfac", "damping": 1e-3, "fit_size": 300})
    solver = context.ihvp()
    full = make_ihvp("ekfac", model, data, 1e-3, cache_dir=ekfac)
    v = torch.randn(1, sum(p.numel() for p in model.parameters()))
    assert not torch.allclose(solver.solve_many(v), full.solve_many(v))  # other factors: fitted on 300 documents


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_gradients_on_cuda_match_the_cpu(split):
    torch.manual_seed(0)
    model = SmallResNetLike().eval()
    data = split.train.subset(np.arange(8))
    cpu = LayerGradients(model, rank=4)
    rows, fisher = cpu.gradients_and_fisher(data)
    gpu_model = SmallResNetLike().eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu = LayerGradients(gpu_model.cuda(), rank=4)
    gpu_rows, gpu_fisher = gpu.gradients_and_fisher(data)  # the same sampled labels: drawn on the CPU
    torch.testing.assert_close(gpu_rows, rows, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gpu_fisher, fisher, rtol=1e-3, atol=1e-6)
