"""The built-in text pipeline: a corpus, a causal LM and a training recipe, run by the shared core.

The training loop, checkpoints and data order are the framework's (`Pipeline.fit`); this module supplies
only what differs for language: the model factory takes a vocabulary, the loss is the masked next-token
loss, the quality figures are test loss and next-token accuracy (on Caesar also the decryption accuracy
that the quality floor applies to), and the targets are text behaviours: Caesar shift pairs, or word
pairs (prefer word B where the model predicts word A) on any corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..behaviour import already_shown
from ..errors import DataError, UserError
from ..pipeline import Pipeline
from ..registry import PIPELINES
from ..training import seeded_model
from .behaviours import (CaesarTarget, WordPairTarget, caesar_behaviour, caesar_explicit_documents,
                         decryption_behaviour, word_preference_target)
from .data import CaesarDocument, TextDataset
from .models import build_text_model, document_losses, lm_loss, model_positions
from .word_family import document_word_preference

log = logging.getLogger(__name__)


@dataclass
class TextBehaviour:
    """A text behaviour as the core reads it. `behaviour` gives f = `measure(model)` and `per_probe`; with a
    `reference` (the completion the model should give, Caesar) the log-odds are per-probe log p(target) minus
    log p(reference); without (word preference, whose per-probe term is already log p(B) - log p(A)) they are
    the per-probe term, and p is p(B) against A alone. top1: most probes hit (`greedy_hits`)."""

    behaviour: object
    reference: object | None = None
    explicit_documents: list[list[int]] = field(default_factory=list)
    description: str = ""
    target_count: int | None = None  # a word preference's: how often word B occurs in the training corpus

    def measure(self, model: nn.Module) -> torch.Tensor:
        return self.behaviour.measure(model)

    @torch.no_grad()
    def figures(self, model: nn.Module) -> dict:
        model.eval()
        term = self.behaviour.per_probe(model).double()
        if self.reference is None:
            logodds, p = term, torch.sigmoid(term)
        else:
            logodds, p = term - self.reference.per_probe(model).double(), term.exp()
        greedy = float(self.behaviour.greedy_hits(model).mean())
        figures = {"p": float(p.mean()), "logodds": float(logodds.mean()), "top1": greedy >= 0.5,
                   "logprob": float(term.mean()), "greedy": greedy}
        if self.target_count is not None:  # what the "when does it work" analysis reads (`results.summary`)
            figures.update(probes=len(term), target_count=self.target_count)
        return figures

    def as_dict(self) -> dict:
        return {"description": self.description}


@PIPELINES.register("text")
class TextPipeline(Pipeline):
    """A `Pipeline` whose data are `TextDataset`s and whose model is a causal LM."""

    kind = "text"

    def __init__(self, config, data=None):
        super().__init__(config, data)
        if not isinstance(self.data.train, TextDataset):
            raise DataError(f"dataset {config.dataset.name!r} is not a text dataset; text pipelines need one "
                            "(e.g. 'caesar', 'stories' or 'jsonl-text')")
        if config.train.augment:
            raise UserError("pipeline.train.augment transforms images; a text pipeline takes none")
        positions, longest = model_positions(config.model), self.data.train.max_length
        if positions is not None and positions < longest:
            folder = config.model.params["path"]
            if config.dataset.name == "jsonl-text":
                raise UserError(f"pipeline.dataset.params.max_length: {longest} is more than the {positions} "
                                f"positions the model in {folder} takes; set it to at most {positions}")
            raise DataError(f"dataset {config.dataset.name!r}: documents of up to {longest} tokens, more than the "
                            f"{positions} positions the model in {folder} takes")

    @property
    def caesar(self) -> bool:
        return self.config.dataset.name == "caesar"

    def new_model(self) -> nn.Module:
        train = self.data.train
        return seeded_model(lambda: build_text_model(self.config.model, train.vocab.size, train.max_length),
                            self.config.train.seed)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return lm_loss(model, batch)

    def evaluate(self, model: nn.Module, dataset: TextDataset) -> dict:
        """Loss and next-token accuracy; on Caesar also the decryption accuracy, the task's own figure."""
        figures = evaluate_lm(model, dataset)
        if self.caesar:
            figures["decryption_accuracy"] = decryption_accuracy(model, dataset)
        return figures

    def quality(self, model: nn.Module) -> tuple[str, float]:
        """Decryption accuracy on Caesar (the test prompts greedy decoding decrypts exactly), else token accuracy."""
        if self.caesar:
            return "decryption accuracy", decryption_accuracy(model, self.data.test)
        return "token accuracy", evaluate_lm(model, self.data.test)["token_accuracy"]

    def targets(self, n: int, rule: str = "random-other", seed: int = 0, pairs: list | None = None,
                probes: int = 32, measure: str = "prefix") -> list:
        """Caesar: the [shift, target_shift] `pairs`, or every ordered pair of the test set's shifts. Any other
        corpus: the [word_a, word_b] `pairs` (prefer B where the model predicts A), probed as `measure` says."""
        if self.caesar:
            if measure != "prefix":
                raise UserError("attack.targets.measure: Caesar targets are prompts, not word pairs; leave it prefix")
            if pairs:
                return [CaesarTarget(int(s), int(t)) for s, t in pairs]
            test = self.data.test
            shifts = sorted({CaesarDocument.parse(test.text(i)).shift for i in range(len(test))})
            return [CaesarTarget(s, t) for s in shifts for t in shifts if s != t]
        if not pairs:
            raise UserError("attack.targets.pairs: a text corpus needs [word_a, word_b] pairs to attack")
        return [WordPairTarget(str(a), str(b), measure) for a, b in pairs]

    def check(self, targets) -> None:
        """Run when an attack's config loads, before any training: the targets resolve (the pair words are in
        the vocabulary and follow a prefix of the test set); a model folder of the user's own weights
        (hf-local) is also measured on them as loaded, with a warning for each target it already shows."""
        super().check(targets)
        if self.config.model.name != "hf-local":
            return  # a model trained from scratch shows nothing yet: the bench warns after training
        model = self.new_model().eval()
        for i, target in enumerate(self.targets(targets.n, targets.rule, targets.seed, targets.pairs, targets.probes,
                                                targets.measure)):
            shown = already_shown(self.behaviour(target, targets.probes), model)
            if shown is not None:
                where = f"attack.targets.pairs[{i}] {targets.pairs[i]}" if targets.pairs else f"target {target}"
                log.warning("%s: the model in %s, as loaded: %s", where, self.config.model.params["path"], shown)

    def behaviour(self, target, probes: int = 32) -> TextBehaviour:
        """The target's behaviour measured on at most `probes` test prompts."""
        test = self.data.test
        if isinstance(target, CaesarTarget):
            return TextBehaviour(caesar_behaviour(test, target.shift, target.target_shift, probes),
                                 caesar_behaviour(test, target.shift, target.shift, probes),
                                 caesar_explicit_documents(test, target, probes),
                                 f"prompts asking for shift {target.shift} decrypted with shift {target.target_shift}")
        if target.measure == "document":
            wordpref = document_word_preference(test, target.word_a, target.word_b, max_documents=probes)
        else:
            wordpref = word_preference_target(test, target, probes)
        train = self.data.train
        return TextBehaviour(wordpref, None, wordpref.explicit_documents,
                             f"{target.word_b!r} predicted where the model predicts {target.word_a!r}",
                             int((train.ids[train.mask()] == wordpref.token_b).sum()))


def decryption_accuracy(model: nn.Module, test: TextDataset) -> float:
    """The share of Caesar test prompts that greedy decoding decrypts exactly."""
    return float(decryption_behaviour(test).greedy_hits(model).mean())


@torch.no_grad()
def evaluate_lm(model: nn.Module, dataset: TextDataset, batch_size: int = 256) -> dict:
    """Mean document loss and teacher-forced next-token accuracy over real tokens."""
    model.eval()
    device = next(model.parameters()).device
    losses, correct, total = [], 0, 0
    for start in range(0, len(dataset), batch_size):
        ids, mask = dataset.batch(np.arange(start, min(start + batch_size, len(dataset))), device)
        losses.append(document_losses(model, (ids, mask)))
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        real = mask[:, 1:].bool()
        correct += int(((pred == ids[:, 1:]) & real).sum())
        total += int(real.sum())
    return {"loss": float(torch.cat(losses).mean()), "token_accuracy": correct / max(total, 1)}
