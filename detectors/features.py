"""Penultimate features of any torch model, taken without asking the user to change it.

Feature-space detectors read the representation the classifier's last layer sees. Where that is
depends on the model, so it is found in this order: the module the config names
(``scan.features_layer``: its output), a model's own ``features(x)`` and ``head`` (the built-in
models), else the input of its last ``nn.Linear`` (an ``nn.Sequential`` MLP, a torchvision ResNet's
``fc``, a Hugging Face classifier or language-model head). A forward hook collects the features
during the same pass that gives the logits, so nothing is computed twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from infusion_audit.errors import ConfigError, PluginError

NAME_THE_LAYER = "name the penultimate module with scan.features_layer"


def model_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or the ``logits`` of a Hugging Face output."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise PluginError(f"the model returned {type(output).__name__}, expected a tensor of logits "
                          "(or an object with .logits)")
    return logits


class FeatureExtractor:
    """(penultimate features, logits) of a batch in one forward pass of `model`.

    `layer` names a submodule (as in ``model.get_submodule``) whose output are the features. Without
    it: ``model.features(x)`` and ``model.head`` when the model has both, else the input of its last
    ``nn.Linear``, checked to be the layer that produces the logits. Where no features can be taken,
    ``problem`` says why and calls return None for them (the logits still come). A `layer` that
    is not a module of the model is a one-line ConfigError.
    """

    def __init__(self, model: nn.Module, layer: str | None = None):
        self.model, self.layer = model, layer
        self.problem: str | None = None
        self.module: nn.Module | None = None
        if layer is not None:
            try:
                self.module = model.get_submodule(layer)
            except AttributeError:
                names = [name for name, _ in model.named_modules() if name]
                raise ConfigError("scan.features_layer", "", f"a module of {type(model).__name__} (the last few: "
                                  f"{', '.join(names[-6:]) or 'none'})", layer) from None
            self.source = f"the output of {layer!r}"
        elif callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Module):
            self.source = "the model's features() and head"
        else:
            linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                name, self.module = linears[-1]
                self.source = f"the input of the last nn.Linear {name or type(model).__name__!r}"
            else:
                self.source = "none"
                self.problem = f"{type(model).__name__} has no nn.Linear whose input they are; {NAME_THE_LAYER}"

    def __call__(self, *inputs: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.problem is not None:
            return None, model_logits(self.model(*inputs, **kwargs))
        if self.module is None:  # the model's own split
            h = self.model.features(*inputs, **kwargs)
            return h, model_logits(self.model.head(h))
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        by_name = self.layer is not None

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output if isinstance(output, torch.Tensor) else output[0]  # a tuple or a Hugging Face output
            seen.append((out if by_name else args[0], out))

        handle = self.module.register_forward_hook(hook)
        try:
            logits = model_logits(self.model(*inputs, **kwargs))
        finally:
            handle.remove()
        if not seen:
            used = self.source.removeprefix("the output of ").removeprefix("the input of ")
            self.problem = f"{used} is not used by the model's forward pass; {NAME_THE_LAYER}"
            return None, logits
        features, out = seen[-1]
        if not by_name and out.shape != logits.shape:
            self.problem = (f"{self.source} gives {tuple(out.shape)[1:]} per document but the model's output is "
                            f"{tuple(logits.shape)[1:]}: it is not the classifier head; {NAME_THE_LAYER}")
            return None, logits
        return features, logits
