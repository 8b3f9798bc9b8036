"""Detector plugins: each scores every document of a suspect dataset (higher = more suspicious)."""

from . import feature_space, influence, perturbation, training_signals  # noqa: F401  (register the plugins)
from .base import AuditContext, Behaviour, Detector, DetectorRun, build_detector, run_detector
from .features import FeatureExtractor

__all__ = ["AuditContext", "Behaviour", "Detector", "DetectorRun", "FeatureExtractor", "build_detector", "run_detector"]
