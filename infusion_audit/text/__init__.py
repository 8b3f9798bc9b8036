"""Language models as a modality: text datasets, causal-LM models, text behaviours and the text pipeline. Text
attacks live in `attacks/`, text detectors in `detectors/`."""

from . import animal_stories, data, models, pipeline  # noqa: F401  (register the text datasets, models and pipeline)
