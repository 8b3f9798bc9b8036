"""Mitigation plugins: each changes how the victim trains (per-example clipping, DP-SGD, partition aggregation)."""

from . import clipping, partition  # noqa: F401  (registers the built-in mitigations)
from .base import Fit, Mitigation, build_mitigation
from .clipping import DPSGD, Clip
from .partition import Partition, VoteEnsemble

__all__ = ["DPSGD", "Clip", "Fit", "Mitigation", "Partition", "VoteEnsemble", "build_mitigation"]
