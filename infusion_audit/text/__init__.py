"""Language models as a domain: text datasets, causal-LM scenarios, behaviours, token-level attacks, text detectors."""

from . import attacks, data, detectors, models  # noqa: F401  (register the text datasets, models, attacks, detectors)
