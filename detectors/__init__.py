"""Detector plugins: each scores every document of a suspect dataset (higher = more suspicious)."""

from . import backdoor, feature_space, influence, perturbation, text, training_signals  # noqa: F401  (register the plugins)
from .base import AuditContext, Detector, DetectorRun, build_detector, run_detector
from .features import FeatureExtractor


def audit_context(data, model=None, **options) -> AuditContext:
    """The context detectors share: for a text corpus with a model, documents' features and losses come
    from the language model (`text.text_context`)."""
    if getattr(data, "kind", "image") == "text" and model is not None:
        return text.text_context(data, model, **options)
    return AuditContext(data, model=model, **options)


__all__ = ["AuditContext", "Detector", "DetectorRun", "FeatureExtractor", "audit_context", "build_detector",
           "run_detector"]
