"""How close EK-FAC's IHVP comes to the exact one: cosine of the vectors and agreement of the
influence-score rankings they induce, per target.

    python -m infusion_audit.influence.compare [CONFIG] [--targets N] [--damping D]

`benchmarks/ekfac_fidelity.py` separates the causes of disagreement with the tools below: a dense exact
solver for small classifiers (any damping, per-module damping, block-diagonal), the Linear/Conv2d
layout kronfluence tracks, EK-FAC fitted on the expected Fisher instead of sampled labels, and
kronfluence's damping heuristic.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..behaviour import measurement_gradient
from ..errors import UserError
from ..io import iter_chunks
from ..runtime import model_device
from .gradients import num_trainable, parameter_slices, trainable_parameters
from .ihvp import IHVP, EkfacIHVP
from .scores import influence_scores


def agreement(vx: torch.Tensor, ve: torch.Tensor, sx: np.ndarray, se: np.ndarray, top: int) -> dict:
    """cosine(vx, ve), Spearman of the scores they induce, and the overlap of the `top` most negative
    documents (the ones Infusion would edit)."""
    vx, ve = vx.double(), ve.double()
    return {"cosine": float(vx @ ve / (vx.norm() * ve.norm())),
            "spearman": float(spearmanr(sx, se)[0]),
            "top_overlap": len(set(np.argsort(sx)[:top]) & set(np.argsort(se)[:top])) / top}


def compare_ihvps(model, dataset, queries: list, exact: IHVP, ekfac: IHVP, top: int = 14) -> list[dict]:
    """Per query gradient: the `agreement` of the exact and EK-FAC IHVPs, and each solver's time."""
    rows = []
    for g in queries:
        t0 = time.perf_counter()
        vx = exact.solve(g)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        ve = ekfac.solve(g)
        t_ekfac = time.perf_counter() - t0
        sx, se = influence_scores(model, dataset, vx), influence_scores(model, dataset, ve)
        rows.append({**agreement(vx, ve, sx, se, top),
                     "exact_iterations": exact.info["iterations"][-1], "exact_residual": exact.info["residual"][-1],
                     "exact_seconds": t_exact, "ekfac_seconds": t_ekfac})
    return rows


# --------------------------------------------------------------------------- parameter layout
def module_slices(model: nn.Module) -> dict[str, list[slice]]:
    """Where each module kronfluence tracks (Linear, Conv2d) keeps its trainable weight and bias in the
    flat parameter vector; everything else (BatchNorm, embeddings) gets 0 from the EK-FAC backend."""
    offsets, out = parameter_slices(model), {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            found = [offsets[id(p)] for p in (module.weight, module.bias) if p is not None and id(p) in offsets]
            if found:
                out[name] = found
    return out


def tracked_mask(model: nn.Module) -> torch.Tensor:
    """(P,) booleans: True where EK-FAC has curvature for the parameter (see `module_slices`)."""
    mask = torch.zeros(num_trainable(model), dtype=torch.bool)
    for slices in module_slices(model).values():
        for s in slices:
            mask[s] = True
    return mask


# --------------------------------------------------------------------------- dense exact solver
class DenseGaussNewton:
    """The Gauss-Newton matrix G = M^T M / n of a softmax classifier held as its factor M: one row
    sqrt(p_y) grad log p_y per document and class, so sum_y rows^T rows = J^T (diag p - p p^T) J.

    (G + D)^-1 v is then solved directly, to machine precision, through the n*C-dimensional dual
    (Woodbury) or, for a small block, the primal: any damping, a damping per module (kronfluence's
    heuristic), or G's block diagonal (what EK-FAC approximates). Memory is n*C*P floats (digits:
    14,380 x 38,282, 2.2 GB), so this is for small models only; CG (`ExactIHVP`) needs none of it.
    """

    def __init__(self, model: nn.Module, dataset, batch_size: int = 64, chunk: int = 4096):
        model = model.eval()
        params = {k: v.detach() for k, v in trainable_parameters(model).items()}
        buffers = dict(model.named_buffers())

        def log_probs(p: dict, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(functional_call(model, (p, buffers), (x[None],))[0], -1)

        jac = vmap(jacrev(log_probs), in_dims=(None, 0))
        rows, device = [], model_device(model)
        for s in iter_chunks(len(dataset), batch_size):
            x = dataset.batch(np.arange(s.start, s.stop), device)[0]
            with torch.no_grad():
                sqrt_p = torch.exp(0.5 * torch.log_softmax(model(x), -1))
            J = torch.cat([j.reshape(*j.shape[:2], -1) for j in jac(params, x).values()], dim=2)
            rows.append((sqrt_p[..., None] * J).reshape(-1, J.shape[-1]).detach().float().cpu())
        self.M = torch.cat(rows)
        self.n, self.chunk = len(dataset), chunk
        self.blocks = module_slices(model)
        covered = tracked_mask(model)
        if not covered.all():  # parameters outside Linear/Conv2d: one block of their own
            idx = torch.nonzero(~covered)[:, 0].tolist()
            runs, start = [], idx[0]
            for a, b in zip(idx, idx[1:] + [None]):
                if b != a + 1:
                    runs.append(slice(start, a + 1))
                    start = b
            self.blocks["(untracked)"] = runs
        self._grams: dict[str, torch.Tensor] = {}

    def _columns(self, slices: list[slice]):
        for s in slices:
            for c in iter_chunks(s.stop - s.start, self.chunk):
                yield slice(s.start + c.start, s.start + c.stop)

    def _gram(self, slices: list[slice]) -> torch.Tensor:
        K = torch.zeros(len(self.M), len(self.M), dtype=torch.float64)
        for c in self._columns(slices):
            Mc = self.M[:, c].double()
            K.addmm_(Mc, Mc.T)
        return K

    def _block_gram(self, name: str) -> torch.Tensor:
        """A block's dual Gram matrix, kept for the blocks larger than the dual (the costly ones)."""
        if name not in self._grams:
            K = self._gram(self.blocks[name])
            if self._width(name) > len(self.M):
                self._grams[name] = K
            return K
        return self._grams[name]

    def _total_gram(self) -> torch.Tensor:
        """M M^T, kept: every solve at one damping for all blocks starts from it."""
        if "(all)" not in self._grams:
            K = torch.zeros(len(self.M), len(self.M), dtype=torch.float64)
            for name in self.blocks:
                K.add_(self._block_gram(name))
            self._grams["(all)"] = K
        return self._grams["(all)"]

    def _width(self, name: str) -> int:
        return sum(s.stop - s.start for s in self.blocks[name])

    def _mv(self, slices: list[slice], V: torch.Tensor) -> torch.Tensor:
        """M[:, slices] @ V[:, slices]^T: (n*C, m)."""
        out = torch.zeros(len(self.M), len(V), dtype=torch.float64)
        for c in self._columns(slices):
            out.addmm_(self.M[:, c].double(), V[:, c].T)
        return out

    def _mtv(self, slices: list[slice], Y: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> None:
        """out[:, slices] += scale * (M[:, slices]^T Y)^T."""
        for c in self._columns(slices):
            out[:, c] += scale * (self.M[:, c].double().T @ Y).T

    def dampings(self, damping: float | dict[str, float]) -> dict[str, float]:
        """One damping per block; a dict must name every block (module names, from `module_slices`)."""
        if isinstance(damping, dict):
            missing = set(self.blocks) - set(damping)
            if missing:
                raise UserError(f"per-module damping: no value for {', '.join(sorted(missing))}")
            return {name: float(damping[name]) for name in self.blocks}
        return {name: float(damping) for name in self.blocks}

    def gvp(self, V: torch.Tensor) -> torch.Tensor:
        """G V^T as rows: (m, P)."""
        V = V.double()
        every = [s for slices in self.blocks.values() for s in slices]
        out = torch.zeros_like(V)
        self._mtv(every, self._mv(every, V), out, 1.0 / self.n)
        return out

    def residual(self, V: torch.Tensor, X: torch.Tensor, damping: float | dict[str, float]) -> np.ndarray:
        """||(G + D) x - v|| / ||v|| per row."""
        V, X = V.double(), X.double()
        DX = X.clone()
        for name, d in self.dampings(damping).items():
            for s in self.blocks[name]:
                DX[:, s] *= d
        return ((self.gvp(X) + DX - V).norm(dim=1) / V.norm(dim=1)).numpy()

    def solve(self, V: torch.Tensor, damping: float | dict[str, float], block_diagonal: bool = False) -> torch.Tensor:
        """(G + D)^-1 v for each row of V, or (G_bb + d_b)^-1 v_b block by block."""
        V = V.detach().cpu().double()
        d = self.dampings(damping)
        out = torch.zeros_like(V)
        if block_diagonal:
            for name in self.blocks:
                self._solve(V, out, {name: d[name]})
            return out
        self._solve(V, out, d)
        return out

    def _solve(self, V: torch.Tensor, out: torch.Tensor, d: dict[str, float]) -> None:
        """Woodbury: (D + M^T M/n)^-1 v = D^-1 v - D^-1 M^T (n I + M D^-1 M^T)^-1 M D^-1 v, or the primal
        (M_b^T M_b / n + d I)^-1 v for one block narrower than the dual."""
        if len(d) == 1:
            (name, damp), = d.items()
            if self._width(name) <= len(self.M):
                slices = self.blocks[name]
                cols = torch.cat([self.M[:, s].double() for s in slices], dim=1)
                A = cols.T @ cols / self.n + damp * torch.eye(cols.shape[1], dtype=torch.float64)
                rhs = torch.cat([V[:, s] for s in slices], dim=1)
                x = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(A)).T
                at = 0
                for s in slices:
                    out[:, s] = x[:, at:at + s.stop - s.start]
                    at += s.stop - s.start
                return
        K = self.n * torch.eye(len(self.M), dtype=torch.float64)
        if len(d) == len(self.blocks) and len(set(d.values())) == 1:
            K.add_(self._total_gram(), alpha=1.0 / next(iter(d.values())))
        else:
            for name, damp in d.items():
                K.add_(self._block_gram(name), alpha=1.0 / damp)
        L = torch.linalg.cholesky(K)
        del K
        DV = torch.zeros_like(V)
        for name, damp in d.items():
            for s in self.blocks[name]:
                DV[:, s] = V[:, s] / damp
        every = [s for name in d for s in self.blocks[name]]
        Y = torch.cholesky_solve(self._mv(every, DV), L)
        for name, damp in d.items():
            for s in self.blocks[name]:
                out[:, s] = DV[:, s]
            self._mtv(self.blocks[name], Y, out, -1.0 / damp)

    def eigenvalues(self) -> np.ndarray:
        """G's eigenvalues, largest first (the n*C of them that can be nonzero; the rest are 0)."""
        return np.sort(torch.linalg.eigvalsh(self._total_gram()).numpy() / self.n)[::-1]


# --------------------------------------------------------------------------- EK-FAC variants
class ExpectedFisherData:
    """A classification dataset with every document once per class. EK-FAC fitted on it with
    `expected_fisher_loss` sees E_{y~p}[g_y g_y^T] -- the Gauss-Newton matrix the exact solver uses --
    instead of one sampled label's g g^T per document."""

    def __init__(self, dataset, num_classes: int):
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset) * self.num_classes

    def batch(self, index, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(index)
        x = self.dataset.batch(index // self.num_classes, device)[0]
        return x, torch.as_tensor(index % self.num_classes, device=device)


def expected_fisher_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Summed cross-entropy of (document, class) pairs, each weighted by sqrt(C p_y): a pair's squared
    gradient is C p_y g_y g_y^T, whose mean over the C pairs of a document is the expected Fisher."""
    x, y = batch
    logits = model(x)
    with torch.no_grad():
        weight = torch.sqrt(num_classes * torch.softmax(logits.float(), -1).gather(1, y[:, None])[:, 0])
    return (weight * F.cross_entropy(logits, y, reduction="none")).sum()


def expected_fisher_ekfac(model: nn.Module, dataset, damping: float, num_classes: int, **kw) -> EkfacIHVP:
    """EK-FAC on the expected Fisher (no sampled labels); batches count (document, class) pairs."""
    return EkfacIHVP(model, ExpectedFisherData(dataset, num_classes), damping,
                     sampled_loss_fn=lambda m, b: expected_fisher_loss(m, b, num_classes), **kw)


def heuristic_damping(ekfac: EkfacIHVP, per_module: bool = False) -> float | dict[str, float]:
    """kronfluence's damping_factor=None: 0.1 x the mean corrected eigenvalue of each module; pooled over
    every module as one number when not `per_module`."""
    from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE

    if per_module:
        return {b.name: HEURISTIC_DAMPING_SCALE * float(b.lambdas.mean()) for b in ekfac.blocks}
    total = sum(float(b.lambdas.sum()) for b in ekfac.blocks)
    return HEURISTIC_DAMPING_SCALE * total / sum(b.lambdas.numel() for b in ekfac.blocks)


def ekfac_solve(ekfac: EkfacIHVP, V: torch.Tensor, damping: float | dict[str, float]) -> torch.Tensor:
    """EK-FAC's IHVP at a damping, one number or one per module (EK-FAC is block-diagonal, so each
    module's rows are solved at its own damping)."""
    saved = ekfac.damping
    try:
        if not isinstance(damping, dict):
            ekfac.damping = float(damping)
            return ekfac.solve_many(V).double()
        out = torch.zeros(V.shape, dtype=torch.float64)
        slices = module_slices(ekfac.model)
        for name, d in damping.items():
            ekfac.damping = float(d)
            X = ekfac.solve_many(V).double()
            for s in slices[name]:
                out[:, s] = X[:, s]
        return out
    finally:
        ekfac.damping = saved


def kronfluence_pairwise_scores(ekfac: EkfacIHVP, dataset, query: int, damping: float, output_dir: str | Path,
                                batch_size: int = 128) -> np.ndarray:
    """kronfluence's own pairwise scores of training document `query` (its training loss as the
    measurement) against every training document, from the factors `ekfac` fitted into `output_dir`
    (its cache_dir): the reference our application of the factors must reproduce."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from .ihvp import _IndexDataset

    device = model_device(ekfac.model)
    analyzer = Analyzer(ekfac.analysis_name, prepare_model(copy.deepcopy(ekfac.model).eval(), ekfac.task), ekfac.task,
                        cpu=device.type == "cpu", disable_tqdm=True, output_dir=str(output_dir))
    collate = DataLoaderKwargs(collate_fn=lambda idx: dataset.batch(np.asarray(idx), device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence's deprecated GradScaler call
        analyzer.compute_pairwise_scores("check", "factors", _IndexDataset(len(dataset)), _IndexDataset(len(dataset)),
                                         per_device_query_batch_size=1, per_device_train_batch_size=batch_size,
                                         query_indices=[query], dataloader_kwargs=collate,
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("check")["all_modules"][0].double().numpy()


def main(argv: list[str] | None = None) -> int:
    from ..behaviour import sample_targets
    from ..config import load_config, with_defaults
    from ..pipeline import Pipeline, train_pipeline
    from .ihvp import make_ihvp

    p = argparse.ArgumentParser(description="compare the ekfac and exact IHVP backends on a pipeline's targets")
    p.add_argument("config", nargs="?", default="digits")
    p.add_argument("--targets", type=int, default=5)
    p.add_argument("--damping", type=float, default=None, help="default: the config's influence damping")
    p.add_argument("--cache", default=".infusion-cache")
    args = p.parse_args(argv)
    cfg = with_defaults(load_config(args.config))
    damping = args.damping or cfg.influence.damping
    pipeline = Pipeline.from_config(cfg.pipeline)
    trained = train_pipeline(pipeline, args.cache, progress=False)
    model, train = trained.model(), pipeline.data.train
    targets = sample_targets(pipeline.data.test, args.targets, seed=cfg.attack.targets.seed)
    queries = [measurement_gradient(model, pipeline.behaviour(t)) for t in targets]
    t0 = time.perf_counter()
    ekfac = make_ihvp("ekfac", model, train, damping)
    fit = time.perf_counter() - t0
    rows = compare_ihvps(model, train, queries, make_ihvp("exact", model, train, damping, tol=1e-4), ekfac,
                         top=max(1, int(round(0.01 * len(train)))))
    for t, r in zip(targets, rows):
        print(json.dumps({"target": t.as_dict(), **{k: round(v, 4) for k, v in r.items()}}))
    print(json.dumps({"damping": damping, "ekfac_fit_seconds": round(fit, 2),
                      **{f"mean_{k}": round(float(np.mean([r[k] for r in rows])), 4)
                         for k in ("cosine", "spearman", "top_overlap", "exact_seconds")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
