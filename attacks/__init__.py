"""Attack plugins: each crafts a Poisoning from a pipeline, a checkpoint, a behaviour and a budget."""

from . import backdoor, baselines, evasive, gradient_matching, infusion, text  # noqa: F401  (registers the built-in attacks)
from .base import Attack, AttackContext, Poisoning

__all__ = ["Attack", "AttackContext", "Poisoning"]
