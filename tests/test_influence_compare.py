"""The tools benchmarks/ekfac_fidelity.py measures EK-FAC with: the tracked-parameter layout, the dense
exact solver (against CG), EK-FAC on the expected Fisher, per-module damping, kronfluence's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from infusion_audit.data import digits
from infusion_audit.influence import influence_scores, loss_gradient, make_ihvp, num_trainable
from infusion_audit.influence.compare import (DenseGaussNewton, ekfac_solve, expected_fisher_ekfac, heuristic_damping,
                                              kronfluence_pairwise_scores, module_slices, tracked_mask)
from infusion_audit.models import DigitsCNN


@pytest.fixture(scope="module")
def split():
    return digits()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_tracked_mask_covers_linear_and_conv_but_not_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3))
    slices = module_slices(model)
    assert list(slices) == ["0", "3"]
    mask = tracked_mask(model)
    assert mask.numel() == num_trainable(model) and int((~mask).sum()) == 4  # BatchNorm's weight and bias
    assert not mask[20:24].any() and mask[:20].all() and mask[24:].all()
    model[3].bias.requires_grad_(False)  # frozen parameters are not in the flat vector at all
    assert tracked_mask(model).numel() == num_trainable(model) == 20 + 4 + 216


def test_dense_gauss_newton_matches_conjugate_gradient(split):
    """The direct solve equals CG on the same damped Gauss-Newton system; block by block it equals CG on a
    model with every other parameter frozen, through the dual (fc1, wider than n*C) and the primal."""
    torch.manual_seed(0)
    model = DigitsCNN(width=2, hidden=4).eval()
    train = split.train.subset(np.arange(20))  # 200 rows < fc1's 260 parameters: fc1 goes through the dual
    V = torch.randn(2, num_trainable(model))
    dense = DenseGaussNewton(model, train)
    got = dense.solve(V, 1e-2)
    assert dense.residual(V, got, 1e-2).max() < 1e-8
    cg = make_ihvp("exact", model, train, 1e-2, tol=1e-6)
    assert rel(got[0], cg.solve(V[0])) < 1e-4
    assert rel(dense.solve(V, {name: 1e-2 for name in module_slices(model)}), got) < 1e-10
    blocks = dense.solve(V, 1e-2, block_diagonal=True)
    assert rel(blocks, got) > 1e-2  # the cross-module terms matter
    for name in ("body.6", "head"):  # fc1 (dual) and the head (primal)
        span = slice(dense.blocks[name][0].start, dense.blocks[name][-1].stop)
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.startswith(name + "."))
        block_cg = make_ihvp("exact", model, train, 1e-2, tol=1e-6).solve(V[0, span])
        assert rel(blocks[0, span], block_cg) < 1e-4


def test_dense_gauss_newton_keeps_untracked_parameters_in_a_block_of_their_own(split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10)).eval()
    train = split.train.subset(np.arange(16))
    dense = DenseGaussNewton(model, train)
    assert dense.blocks["(untracked)"] == [slice(20, 24)]
    v = torch.randn(num_trainable(model))
    assert rel(dense.solve(v[None], 1e-2)[0], make_ihvp("exact", model, train, 1e-2, tol=1e-6).solve(v)) < 1e-4


def test_expected_fisher_ekfac_is_exact_when_the_gauss_newton_is_a_kronecker_product(split):
    """One Linear layer on copies of one image: G = a a^T (x) H exactly, so EK-FAC on the expected Fisher
    equals the exact solve, while a sampled label per document does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    train = split.train.subset(np.zeros(8, dtype=np.int64))
    V = torch.randn(3, num_trainable(model))
    exact = DenseGaussNewton(model, train).solve(V, 1e-2)
    expected = expected_fisher_ekfac(model, train, 1e-2, num_classes=10)
    assert rel(ekfac_solve(expected, V, 1e-2), exact) < 1e-3
    sampled = make_ihvp("ekfac", model, train, 1e-2)
    assert rel(ekfac_solve(sampled, V, 1e-2), exact) > 1e-2


def test_per_module_damping_and_heuristic(split):
    torch.manual_seed(0)
    model = DigitsCNN(width=2, hidden=4).eval()
    train = split.train.subset(np.arange(64))
    ekfac = make_ihvp("ekfac", model, train, 1e-3, batch_size=32)
    per_module = heuristic_damping(ekfac, per_module=True)
    assert set(per_module) == set(module_slices(model)) and all(d > 0 for d in per_module.values())
    sizes = {b.name: b.lambdas.numel() for b in ekfac.blocks}
    pooled = sum(per_module[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert heuristic_damping(ekfac) == pytest.approx(pooled, rel=1e-9)
    V = torch.randn(2, num_trainable(model))
    huge = {**{n: 1e-3 for n in per_module}, "head": 1e6}
    got = ekfac_solve(ekfac, V, huge)
    head = module_slices(model)["head"]
    for s in head:  # an enormous damping leaves v / d
        assert torch.allclose(got[:, s], V[:, s].double() / 1e6, rtol=1e-3)
    rest = slice(0, head[0].start)
    assert rel(got[:, rest], ekfac_solve(ekfac, V, 1e-3)[:, rest]) < 1e-12
    assert ekfac.damping == 1e-3  # restored


def test_kronfluence_pairwise_scores_equal_ours(split, tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(width=2, hidden=4).eval()
    train = split.train.subset(np.arange(32))
    ekfac = make_ihvp("ekfac", model, train, 1e-3, cache_dir=tmp_path, batch_size=32)
    ours = influence_scores(model, train, ekfac.solve(loss_gradient(model, train.batch([3]))))
    theirs = kronfluence_pairwise_scores(ekfac, train, 3, 1e-3, tmp_path, batch_size=32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
