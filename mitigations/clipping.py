"""Bounded per-document influence: per-example gradient clipping (`clip`) and DP-SGD (`dp-sgd`).

Both train through the built-in loop's `wrap` hook with Opacus: GradSampleModule computes each
document's gradient, DPOptimizer clips every one to `max_grad_norm`, adds N(0, (σ·max_grad_norm)²)
noise to their sum (σ = 0 for `clip`) and averages. One document then moves a step by at most
lr · max_grad_norm / batch size, however extreme its content; with noise that bound becomes a
differential-privacy guarantee, whose ε Opacus' RDP accountant reports.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from torch import nn

from infusion_audit.errors import UserError
from infusion_audit.registry import MITIGATIONS
from infusion_audit.training import Checkpoint, Retrained

from .base import Fit, Mitigation, check_param, is_number, until_epoch

SAMPLING = "shuffled fixed-size batches (the accountant assumes Poisson sampling at rate batch size / documents)"


@functools.cache
def _batch_mean_optimizer() -> type:
    """Opacus' DPOptimizer averaging over the batch actually drawn, not the expected batch size.

    Our batches are slices of a fixed permutation, so their size is public (only the last is smaller);
    dividing by it makes a wrap with nothing clipped take exactly the plain loop's mean-loss step, so
    `clip` costs what clipping costs and nothing else. Noise and clipping are Opacus' own."""
    from opacus.optimizers import DPOptimizer

    class BatchMeanDPOptimizer(DPOptimizer):
        def scale_grad(self) -> None:
            count = len(self.grad_samples[0])
            for p in self.params:
                p.grad /= count

    return BatchMeanDPOptimizer


class OpacusWrap:
    """The `wrap` hook: per-example gradients, clipped and noised, with the steps counted by Opacus' RDP
    accountant (and how many per-example gradients the clip actually shortened). `unwrap()` after
    training removes Opacus' hooks and attributes, leaving a plain model."""

    def __init__(self, mitigation: str, max_grad_norm: float, noise_multiplier: float, noise_seed: int):
        from opacus.accountants import RDPAccountant

        self.mitigation, self.max_grad_norm = mitigation, max_grad_norm
        self.noise_multiplier, self.noise_seed = noise_multiplier, noise_seed
        self.accountant = RDPAccountant()
        self.sample_rate: float | None = None
        self.calls = self.steps = self.examples = self.clipped = 0
        self._wrapped: list[Any] = []

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n_documents: int,
                 batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        from opacus import GradSampleModule

        mixing = [name or type(model).__name__ for name, m in model.named_modules()
                  if any(True for _ in m.buffers(recurse=False))
                  and any(p.requires_grad for p in m.parameters(recurse=False))]
        if mixing:
            raise UserError(
                f"mitigation {self.mitigation!r} needs per-example gradients, which {type(model).__name__} cannot "
                f"give: trainable layers with buffers ({', '.join(mixing[:3])}{', ...' if len(mixing) > 3 else ''}; "
                "BatchNorm mixes the documents of a batch); replace them (e.g. GroupNorm, which "
                "opacus.validators.ModuleValidator.fix does) or use 'partition'")
        self.calls += 1
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.noise_seed)
        wrapped = _batch_mean_optimizer()(optimizer, noise_multiplier=self.noise_multiplier,
                                          max_grad_norm=self.max_grad_norm, expected_batch_size=batch_size,
                                          loss_reduction="mean", generator=generator)
        self.sample_rate = min(1.0, batch_size / n_documents)
        account = self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)

        def on_step(opt: Any) -> None:
            account(opt)
            norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in opt.grad_samples], 1).norm(dim=1)
            self.steps += 1
            self.examples += len(norms)
            self.clipped += int((norms > self.max_grad_norm).sum())

        wrapped.attach_step_hook(on_step)
        self._wrapped.append((module, wrapped))
        return module, wrapped

    def unwrap(self) -> None:
        """Leave the trained model as it was built: no hooks, no per-sample gradient attributes."""
        for module, optimizer in self._wrapped:
            module.to_standard_module()
            for p in optimizer.params:
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
        self._wrapped.clear()

    def figures(self) -> dict:
        return {"max_grad_norm": self.max_grad_norm, "steps": self.steps,
                "clipped_fraction": self.clipped / self.examples if self.examples else None}


class PerExampleClipping(Mitigation):
    """Shared by `clip` and `dp-sgd`: retrain through an OpacusWrap and report its figures."""

    needs_wrap = True
    wraps_to = "clip per-example gradients"
    max_grad_norm: float
    noise_multiplier: float = 0.0
    noise_seed: int = 0

    def _check_norm(self) -> None:
        check_param(self.name, "max_grad_norm", self.max_grad_norm, "a number > 0",
                    is_number(self.max_grad_norm) and self.max_grad_norm > 0)

    def retrain(self, fit: Fit, new_model: Callable[[], nn.Module], dataset: Any, start: Checkpoint | None = None,
                epochs: int | None = None) -> Retrained:
        self.check_fit(fit)
        wrap = OpacusWrap(self.name, self.max_grad_norm, self.noise_multiplier, self.noise_seed)
        try:
            with warnings.catch_warnings():  # Opacus' hooks on a model whose input needs no gradient: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                model = fit(new_model(), dataset, start=start, until_epoch=until_epoch(start, epochs), wrap=wrap)
        finally:
            wrap.unwrap()
        if wrap.calls == 0:
            raise UserError(f"mitigation {self.name!r}: the pipeline's fit accepts `wrap` but never called it, so "
                            "nothing was clipped; call `module, optimizer = wrap(model, optimizer, len(dataset), "
                            "batch_size)` before its loop")
        return Retrained(model, self.figures(wrap, start))

    def figures(self, wrap: OpacusWrap, start: Checkpoint | None) -> dict:
        return wrap.figures()


@MITIGATIONS.register("clip")
class Clip(PerExampleClipping):
    """Per-example gradient clipping at max_grad_norm, no noise (Opacus): bounds each document's step."""

    name = "clip"

    def __init__(self, max_grad_norm: float = 1.0):
        self.max_grad_norm = max_grad_norm
        self._check_norm()


@MITIGATIONS.register("dp-sgd")
class DPSGD(PerExampleClipping):
    """DP-SGD (Opacus): per-example clipping plus Gaussian noise; reports the RDP accountant's ε at δ."""

    name = "dp-sgd"

    def __init__(self, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, delta: float = 1e-5,
                 noise_seed: int = 0):
        # noise_seed seeds the noise generator afresh in every retrain: a poisoned retrain and its clean
        # control draw the same noise, so they differ only by the poison
        self.noise_multiplier, self.max_grad_norm, self.delta, self.noise_seed = (noise_multiplier, max_grad_norm,
                                                                                 delta, noise_seed)
        self._check_norm()
        check_param(self.name, "noise_multiplier", noise_multiplier, "a number > 0 (no noise is 'clip')",
                    is_number(noise_multiplier) and noise_multiplier > 0)
        check_param(self.name, "delta", delta, "a number in (0, 1)", is_number(delta) and 0 < delta < 1)
        check_param(self.name, "noise_seed", noise_seed, "an integer", isinstance(noise_seed, int)
                    and not isinstance(noise_seed, bool))

    def figures(self, wrap: OpacusWrap, start: Checkpoint | None) -> dict:
        epsilon = wrap.accountant.get_epsilon(self.delta) if wrap.steps else 0.0
        scope = ("the retrained epochs only: the start checkpoint (epoch "
                 f"{start.epoch}) was trained without noise" if start is not None and start.epoch > 0
                 else "all training")
        return {**wrap.figures(), "noise_multiplier": self.noise_multiplier, "epsilon": float(epsilon),
                "delta": self.delta, "accountant": "rdp", "sample_rate": wrap.sample_rate, "sampling": SAMPLING,
                "epsilon_covers": scope}
