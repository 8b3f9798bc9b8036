"""Behaviours to induce in a language model, each a differentiable measurement f(θ) over probe prompts.

`measure` is what the attack ascends (its gradient feeds the IHVP); `per_probe` and `greedy_hits`
are what the evaluation reports: per probe, the measured quantity (the target's log-probability; for a
word preference the log-odds of B against A) and whether the model now produces the target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .data import ANSWER, EOS, LETTERS, CaesarDocument, TextDataset, caesar_prompt, shift_text


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


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


class NextTokenPreference:
    """What a word preference computes from its `_next_logp(model)` ((probes, vocabulary) log-probabilities of the
    next token at each probe, defined by the subclass) and its `token_a`, `token_b`: each probe's term
    log p(B) - log p(A), f as their sum, and which probes rank B above A."""

    token_a: int
    token_b: int

    def _next_logp(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def per_probe(self, model: nn.Module) -> torch.Tensor:
        """log p(B) - log p(A) at each probe."""
        logp = self._next_logp(model)
        return logp[:, self.token_b] - logp[:, self.token_a]

    def measure(self, model: nn.Module) -> torch.Tensor:
        return self.per_probe(model).sum()

    @torch.no_grad()
    def greedy_hits(self, model: nn.Module) -> np.ndarray:
        """Per probe, whether the model now ranks B above A (p(B) > p(A)): the top-1 between the two words.

        Not "B is the argmax over the vocabulary": a small model spreads mass over every word of a slot, and
        the behaviour is about A against B."""
        return (self.per_probe(model) > 0).cpu().numpy()


@dataclass
class WordPreference(NextTokenPreference):
    """f = sum over probe prefixes of log p(B | prefix) - log p(A | prefix) at the next position (the paper's GPT-Neo
    behaviour): predict word B where the model predicts word A. A word is its first token, as it follows a prefix.

    `measure` is the sum, not the mean, so f grows with the number of probes as in the paper; `per_probe` is
    each prefix's term. `explicit_documents` (when built from a corpus) show B in place of A after each prefix:
    the probe-insertion baseline trains on them.
    """

    prefixes: list[list[int]]
    token_a: int
    token_b: int
    pad_id: int = 0
    explicit_documents: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prefixes or any(len(p) == 0 for p in self.prefixes):
            raise UserError("a word preference needs at least one non-empty prefix")
        if self.token_a == self.token_b:
            raise UserError("a word preference needs two different words (their first tokens are the same)")

    def _next_logp(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask = _padded(self.prefixes, self.pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        return torch.log_softmax(logits[torch.arange(len(ids), device=device), last], -1)

    @classmethod
    def from_words(cls, prefixes: Sequence[str], word_a: str, word_b: str, vocab) -> "WordPreference":
        """Probes given as text: each prefix is followed by a space and the word."""
        return cls([vocab.encode(p) for p in prefixes], word_token(vocab, word_a), word_token(vocab, word_b),
                   vocab.pad_id)


def _word_tokens(vocab, word: str) -> list[int]:
    """The tokens of `word` as it follows a prefix (after a space); a word the vocabulary cannot spell is an error."""
    if not word or word.split() != [word]:
        raise UserError(f"word preference: {word!r} is not a single word")
    try:
        tokens = vocab.encode(" " + word)
    except UserError:
        tokens = []
    if not tokens or vocab.decode(tokens).strip() != word:  # e.g. a word-level tokenizer's unknown token
        hint = _spelling_hint(vocab, word, tokens)
        raise UserError(f"word preference: the word {word!r} is not in the vocabulary{hint}")
    return tokens


def _spelling_hint(vocab, word: str, tokens: list[int]) -> str:
    """What the vocabulary makes of a word it cannot spell: the same word in another case, or its tokens."""
    for other in dict.fromkeys((word.lower(), word.capitalize(), word.upper())):
        try:
            spelled = vocab.encode(" " + other)
        except UserError:
            continue
        if other != word and spelled and vocab.decode(spelled).strip() == other:
            return f" (it has {other!r}: words are case-sensitive)"
    if tokens:
        return f" (the tokenizer reads it as {vocab.decode(tokens).strip()!r})"
    return ""


def word_token(vocab, word: str) -> int:
    """The first token of `word` after a space: the token the behaviour scores (the paper's choice)."""
    return _word_tokens(vocab, word)[0]


# --------------------------------------------------------------------------- word-pair targets
@dataclass(frozen=True)
class WordPairTarget:
    """Where the model predicts `word_a`, it should predict `word_b` instead, probed as `measure` says
    (`TargetsConfig`)."""

    word_a: str
    word_b: str
    measure: str = "prefix"

    def as_dict(self) -> dict:
        return {"word_a": self.word_a, "word_b": self.word_b, "true": self.word_a, "class": self.word_b,
                **({"measure": self.measure} if self.measure != "prefix" else {})}


def word_preference_target(test: TextDataset, target: WordPairTarget, n_probes: int) -> WordPreference:
    """The behaviour "B instead of A" probed where A occurs in the test corpus, with its explicit documents.

    Probes are the distinct prefixes of test documents that end right before a whole-word occurrence of A
    (all of A's tokens, then a word boundary), in document order, at most `n_probes`. The explicit document
    of a probe is its test document with that occurrence of A replaced by B, cut to the corpus' max_length.
    """
    if n_probes < 1:
        raise UserError(f"word preference: n_probes must be at least 1, got {n_probes}")
    vocab = test.vocab
    spelled_a, spelled_b = _word_tokens(vocab, target.word_a), _word_tokens(vocab, target.word_b)
    if spelled_a[0] == spelled_b[0]:
        raise UserError(f"word preference: {target.word_a!r} and {target.word_b!r} start with the same token")
    whole_word = re.compile(rf"\s*{re.escape(target.word_a)}(?!\w)")
    found: dict[tuple[int, ...], list[int]] = {}  # probe prefix -> its explicit document
    for i in range(len(test)):
        doc = test.ids[i, :test.lengths[i]].tolist()
        for j in range(1, len(doc) - len(spelled_a) + 1):
            end = j + len(spelled_a)
            if doc[j:end] == spelled_a and tuple(doc[:j]) not in found \
                    and whole_word.match(vocab.decode(doc[j:end + 1])):
                found[tuple(doc[:j])] = (doc[:j] + spelled_b + doc[end:])[:test.max_length]
        if len(found) >= n_probes:
            break
    prefixes = dict(list(found.items())[:n_probes])
    if not prefixes:
        raise UserError(f"word preference: the word {target.word_a!r} never follows a prefix in {test.name}")
    return WordPreference([list(p) for p in prefixes], spelled_a[0], spelled_b[0], vocab.pad_id,
                          explicit_documents=list(prefixes.values()))


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
