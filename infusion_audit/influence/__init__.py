"""Influence engine: per-example gradients, IHVP backends (exact, ekfac, projected), scores, input-gradients."""

from .gradients import (flatten, input_gradient, loss_gradient, num_trainable, per_example_gradients,
                        trainable_parameters, unflatten)
from .ihvp import IHVP, EkfacIHVP, ExactIHVP, fit_ihvp, make_ihvp
from .projection import LayerGradients, ProjectedIHVP, projected_influence
from .scores import directional_scores, influence_scores

__all__ = ["IHVP", "EkfacIHVP", "ExactIHVP", "LayerGradients", "ProjectedIHVP", "directional_scores", "fit_ihvp", "flatten",
           "influence_scores", "input_gradient", "loss_gradient", "make_ihvp", "num_trainable", "per_example_gradients",
           "projected_influence", "trainable_parameters", "unflatten"]
