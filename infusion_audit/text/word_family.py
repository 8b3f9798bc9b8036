"""The paper's word-preference measurement on whole documents, and edits within a word family.

`DocumentWordPreference` is f as the paper's GPT-Neo code computes it: validation documents holding word A
at least `min_count` times, and at every position where A occurs, log p(B | prefix) - log p(A | prefix),
summed. One forward pass per document gives every position (the model is causal), so the probes are all the
occurrences, the first mention (where only how often each word is used tells A from B) as well as the later
ones (where the document itself names A). `first` marks first mentions, for the analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .behaviours import NextTokenPreference, _padded, word_token
from .data import TextDataset


@dataclass
class DocumentWordPreference(NextTokenPreference):
    """f = sum over the occurrences of A in `documents` (positions `positions[d]`) of log p(B) - log p(A) there."""

    documents: list[list[int]]
    positions: list[list[int]]
    token_a: int
    token_b: int
    pad_id: int = 0
    explicit_documents: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.documents or len(self.documents) != len(self.positions) or not all(self.positions):
            raise UserError("a document word preference needs documents, each with at least one position")
        if any(j < 1 or j >= len(d) or d[j] != self.token_a for d, ps in zip(self.documents, self.positions) for j in ps):
            raise UserError("every position must hold word A after at least one token")
        if not self.explicit_documents:  # the probe documents with B for every A: probe insertion trains on them
            self.explicit_documents = [[self.token_b if t == self.token_a else t for t in d] for d in self.documents]

    @property
    def n_probes(self) -> int:
        return sum(len(p) for p in self.positions)

    @property
    def first(self) -> np.ndarray:
        """Per probe, whether it is A's first occurrence in its document."""
        return np.array([j == ps[0] for ps in self.positions for j in ps])

    def _next_logp(self, model: nn.Module) -> torch.Tensor:
        """(probes, vocabulary) log-probabilities of the next token at every probe."""
        device = next(model.parameters()).device
        ids, mask = _padded(self.documents, self.pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        rows = torch.tensor([d for d, ps in enumerate(self.positions) for _ in ps], device=device)
        cols = torch.tensor([j - 1 for ps in self.positions for j in ps], device=device)
        return torch.log_softmax(logits[rows, cols], -1)

    @torch.no_grad()
    def top1(self, model: nn.Module) -> np.ndarray:
        """Per probe, whether B is the model's most likely next token (over the whole vocabulary)."""
        return (self._next_logp(model).argmax(-1) == self.token_b).cpu().numpy()


def document_word_preference(test: TextDataset, word_a: str, word_b: str, min_count: int = 5,
                             max_documents: int = 8) -> DocumentWordPreference:
    """Prefer `word_b` where the model predicts `word_a`, probed at every occurrence of A in the first
    `max_documents` test documents (in order) that hold A at least `min_count` times (fewer when A is rare:
    then the documents with the most occurrences, at least one)."""
    vocab = test.vocab
    a, b = word_token(vocab, word_a), word_token(vocab, word_b)
    if a == b:
        raise UserError(f"word preference: {word_a!r} and {word_b!r} start with the same token")
    docs = [test.ids[i, :test.lengths[i]].tolist() for i in range(len(test))]
    counts = np.array([d[1:].count(a) for d in docs])
    chosen = [i for i in np.flatnonzero(counts >= min_count)][:max_documents]
    if not chosen:
        order = np.argsort(-counts, kind="stable")
        chosen = [i for i in order[:max_documents] if counts[i] > 0]
    if not chosen:
        raise UserError(f"word preference: the word {word_a!r} never follows a prefix in {test.name}")
    chosen = sorted(int(i) for i in chosen)
    return DocumentWordPreference([docs[i] for i in chosen], [[j for j in range(1, len(docs[i])) if docs[i][j] == a]
                                                            for i in chosen], a, b, vocab.pad_id)


def word_counts(dataset: TextDataset, words: Sequence[str]) -> dict[str, int]:
    """How often each word's first token occurs in the real tokens of `dataset`."""
    real = dataset.ids[dataset.mask()]
    return {w: int((real == word_token(dataset.vocab, w)).sum()) for w in words}


def replace_words(dataset: TextDataset, index: Sequence[int], mapping: dict[int, int], budget: np.ndarray | None = None
                  ) -> np.ndarray:
    """Documents `index` with token t replaced by mapping[t], in document order, at most `budget[j]` replacements
    in document j (all of them when None): the natural edit of a story (rename its animal)."""
    ids = dataset.ids[np.asarray(index)].copy()
    for j, (row, length) in enumerate(zip(ids, dataset.lengths[np.asarray(index)])):
        left = np.inf if budget is None else int(budget[j])
        for pos in range(int(length)):
            if left <= 0:
                break
            if int(row[pos]) in mapping:
                row[pos] = mapping[int(row[pos])]
                left -= 1
    return ids
