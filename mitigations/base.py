"""The mitigation plugin kind: a mitigation changes how the victim trains, not what it trains on.

The bench retrains the victim under a mitigation wherever it would retrain it plainly (the poisoned set
and its clean control, both under the same mitigation), through the pipeline's own training function:

    fit(model, dataset, start=None, until_epoch=None, wrap=None) -> nn.Module

trains `model` by the victim's recipe from checkpoint `start` (or its initialisation) to `until_epoch`.
`wrap(model, optimizer, n_documents, batch_size) -> (module, optimizer)` is the built-in loop's hook for
what it steps with (Opacus' per-example clipping); a mitigation that needs it sets `needs_wrap`, and a
`fit` without the keyword (a user's own loop) is refused with a sentence saying so, before any training.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from infusion_audit.errors import ConfigError, UserError
from infusion_audit.training import Checkpoint, Retrained

Fit = Callable[..., nn.Module]


class Mitigation:
    """Base of mitigation plugins: parameters in __init__, `retrain(fit, new_model, dataset, start, epochs)`."""

    name: str = "mitigation"
    needs_wrap: bool = False  # True: it trains through the `wrap` hook of the built-in training loop
    wraps_to: str = "change how each step is computed"  # what its wrap does, for check_fit's sentence

    def retrain(self, fit: Fit, new_model: Callable[[], nn.Module], dataset: Any, start: Checkpoint | None = None,
                epochs: int | None = None) -> Retrained:
        """Train by `fit` on `dataset` from `start` (None: `new_model()`'s seeded initialisation) for
        `epochs` epochs (None: to the recipe's last epoch), under this mitigation."""
        raise NotImplementedError

    def check_fit(self, fit: Fit) -> None:
        """Refuse, in one sentence, a `fit` this mitigation cannot work through."""
        if self.needs_wrap and not accepts_keyword(fit, "wrap"):
            owner = getattr(fit, "__self__", None)
            what = f"pipeline {type(owner).__name__}" if owner is not None else f"fit {_qualname(fit)}"
            raise UserError(
                f"mitigation {self.name!r} wraps the optimizer of the built-in training loop; {what} trains with "
                f"its own loop, which takes no `wrap` keyword, so it cannot {self.wraps_to}. Give its fit a `wrap` "
                f"argument and train with `module, optimizer = wrap(model, optimizer, len(dataset), batch_size)`, "
                f"or use 'partition', which works with any fit")

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters
                if name != "self"}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` can be called with keyword `name` (named, or through **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume it does not
        return False
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in parameters)


def _qualname(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def until_epoch(start: Checkpoint | None, epochs: int | None) -> int | None:
    """The epoch `epochs` epochs after `start` (None: the recipe's last)."""
    return None if epochs is None else (start.epoch if start is not None else 0) + epochs


def check_param(mitigation: str, key: str, value: Any, expected: str, ok: bool) -> None:
    """A mitigation parameter outside its range: a one-line ConfigError naming the mitigation and key."""
    if not ok:
        raise ConfigError(f"mitigation {mitigation!r}", key, expected, value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_mitigation(name: str, params: dict | None = None) -> Mitigation:
    """Instantiate a registered mitigation (or ``package.module:Class``) with one-line errors."""
    from infusion_audit.registry import MITIGATIONS

    cls = MITIGATIONS.get(name)
    try:
        mitigation = cls(**(params or {}))
    except TypeError as exc:
        raise ConfigError(f"mitigation {name!r}", "params", f"parameters it takes ({exc})", params or {}) from None
    if not isinstance(mitigation, Mitigation):
        raise UserError(f"mitigation {name!r} built a {type(mitigation).__name__}, not a Mitigation")
    mitigation.name = name
    return mitigation
