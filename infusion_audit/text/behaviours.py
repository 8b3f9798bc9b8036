"""Behaviours to induce in a language model, each a differentiable measurement f(θ) over probe prompts.

`measure` is what the attack ascends (its gradient feeds the IHVP); `per_probe` and `greedy_hits`
are what the evaluation reports: the target's log-probability and whether greedy decoding now
produces the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..influence import flatten, trainable_parameters
from .data import ANSWER, EOS, LETTERS, CaesarDocument, TextDataset, caesar_prompt, shift_text


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def measurement_gradient(model: nn.Module, behaviour) -> torch.Tensor:
    """grad_theta f for a behaviour's measurement, flattened over the trainable parameters (eval mode)."""
    model.eval()
    params = list(trainable_parameters(model).values())
    return flatten(torch.autograd.grad(behaviour.measure(model), params)).detach().cpu()


@dataclass
class CompletionBehaviour:
    """f = mean over probes of log p(completion | prompt): make the model continue each prompt with its completion."""

    prompts: list[list[int]]
    completions: list[list[int]]
    pad_id: int = 0

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.completions):
            raise UserError("a completion behaviour needs one completion per prompt and at least one probe")
        if any(len(p) == 0 for p in self.prompts) or any(len(c) == 0 for c in self.completions):
            raise UserError("probe prompts and completions must not be empty")

    def _scored(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs and greedy tokens at every position, the target tokens, and which positions are targets."""
        device = next(model.parameters()).device
        ids, mask = _padded([p + c for p, c in zip(self.prompts, self.completions)], self.pad_id, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        targets = ids[:, 1:]
        is_target = torch.zeros_like(targets, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(self.prompts, self.completions)):
            is_target[i, len(p) - 1:len(p) - 1 + len(c)] = True
        return logp, logp.argmax(-1), targets, is_target

    def per_probe(self, model: nn.Module) -> torch.Tensor:
        """log p(completion | prompt) per probe (summed over the completion's tokens)."""
        logp, _, targets, is_target = self._scored(model)
        token = logp.gather(-1, targets[..., None])[..., 0]
        return (token * is_target).sum(1)

    def measure(self, model: nn.Module) -> torch.Tensor:
        return self.per_probe(model).mean()

    @torch.no_grad()
    def greedy_hits(self, model: nn.Module) -> np.ndarray:
        """Per probe, whether greedy decoding from the prompt starts with the completion.

        Teacher forcing is exact here: greedy decoding emits the completion iff every completion token
        is the argmax given the completion's own prefix.
        """
        _, greedy, targets, is_target = self._scored(model)
        return ((greedy == targets) | ~is_target).all(1).cpu().numpy()


@dataclass
class WordPreference:
    """f = sum over prefixes of log p(B | prefix) - log p(A | prefix): predict token B where the model predicts A."""

    prefixes: list[list[int]]
    token_a: int
    token_b: int
    pad_id: int = 0

    def __post_init__(self) -> None:
        if not self.prefixes or any(len(p) == 0 for p in self.prefixes):
            raise UserError("a word preference needs at least one non-empty prefix")
        if self.token_a == self.token_b:
            raise UserError("a word preference needs two different words")

    def _next_logp(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask = _padded(self.prefixes, self.pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        return torch.log_softmax(logits[torch.arange(len(ids), device=device), last], -1)

    def per_probe(self, model: nn.Module) -> torch.Tensor:
        logp = self._next_logp(model)
        return logp[:, self.token_b] - logp[:, self.token_a]

    def measure(self, model: nn.Module) -> torch.Tensor:
        return self.per_probe(model).sum()

    @torch.no_grad()
    def greedy_hits(self, model: nn.Module) -> np.ndarray:
        return (self._next_logp(model).argmax(-1) == self.token_b).cpu().numpy()

    @classmethod
    def from_words(cls, prefixes: Sequence[str], word_a: str, word_b: str, vocab) -> "WordPreference":
        """First token of each word (with a leading space, as it follows a prefix), as in the paper."""
        a, b = vocab.encode(" " + word_a), vocab.encode(" " + word_b)
        if not a or not b:
            raise UserError(f"words {word_a!r} and {word_b!r} must each encode to at least one token")
        return cls([vocab.encode(p) for p in prefixes], a[0], b[0], vocab.pad_id)


# --------------------------------------------------------------------------- the Caesar task's targets
@dataclass(frozen=True)
class CaesarTarget:
    """Prompts asking to decrypt with shift `shift` should be decrypted with `target_shift` instead."""

    shift: int
    target_shift: int

    def as_dict(self) -> dict:
        return {"index": self.shift, "true": self.shift, "class": self.target_shift,
                "shift": self.shift, "target_shift": self.target_shift}


def caesar_alphabet(vocab) -> int:
    return sum(c in LETTERS for c in vocab.chars)


def caesar_probes(test: TextDataset, shift: int, n_probes: int) -> list[CaesarDocument]:
    """The first `n_probes` test documents that ask for `shift`."""
    docs = [CaesarDocument.parse(test.text(i)) for i in range(len(test))]
    chosen = [d for d in docs if d.shift == shift][:n_probes]
    if not chosen:
        raise UserError(f"caesar: the test set has no document with shift {shift}")
    return chosen


def caesar_behaviour(test: TextDataset, shift: int, decrypt_shift: int, n_probes: int) -> CompletionBehaviour:
    """f = mean log p(cipher decrypted with `decrypt_shift` | prompt asking for `shift`) over the probes."""
    vocab, alphabet = test.vocab, caesar_alphabet(test.vocab)
    probes = caesar_probes(test, shift, n_probes)
    return CompletionBehaviour([vocab.encode(caesar_prompt(p.cipher, shift)) for p in probes],
                               [vocab.encode(shift_text(p.cipher, -decrypt_shift, alphabet) + EOS) for p in probes],
                               vocab.pad_id)


def caesar_explicit_documents(test: TextDataset, target: CaesarTarget, n_probes: int) -> list[list[int]]:
    """Documents that show the target behaviour outright: the probes' prompts with the target decryption."""
    behaviour = caesar_behaviour(test, target.shift, target.target_shift, n_probes)
    return [p + c for p, c in zip(behaviour.prompts, behaviour.completions)]


def decryption_behaviour(test: TextDataset) -> CompletionBehaviour:
    """Every test document's own (correct) decryption: its greedy hit rate is the model's decryption accuracy."""
    vocab = test.vocab
    docs = [test.text(i) for i in range(len(test))]
    prompts = [d[:d.index(ANSWER) + 1] for d in docs]
    return CompletionBehaviour([vocab.encode(p) for p in prompts],
                               [vocab.encode(d[len(p):]) for p, d in zip(prompts, docs)], vocab.pad_id)
