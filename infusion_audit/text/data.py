"""Text datasets: token-id documents for causal language models, the built-in Caesar task, JSON-lines corpora.

A document is a row of token ids padded on the right; `lengths` says where its text ends, so padding
is never trained on, never counted as an edit and never shown. Documents decode back to plain text:
a poisoned set is a set of real documents a user could publish, not embeddings.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ..data import MANIFEST, DatasetSplit, seeded_split
from ..errors import DataError, first_line
from ..io import array_hash, atomic_write_text, stable_hash, write_json
from ..registry import DATASETS
from .models import quiet_transformers

CORPUS = "train.jsonl"
TEXT_DOCUMENTS = "documents.jsonl"  # the edited documents only, before and after, for the report's diffs


class Vocabulary(Protocol):
    """What the framework needs from a tokenizer."""

    size: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class CharVocabulary:
    """One token per character; `pad` is a character that never occurs in a document."""

    chars: str
    pad: str = "_"

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars) or self.pad not in self.chars:
            raise DataError(f"character vocabulary {self.chars!r}: characters must be unique and include {self.pad!r}")

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def pad_id(self) -> int:
        return self.chars.index(self.pad)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise DataError(f"text {text[:40]!r} has characters outside the vocabulary: {''.join(unknown)!r}")
        return [self.chars.index(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


@dataclass(frozen=True)
class WordVocabulary:
    """One token per whitespace-separated word; `pad` is a word that never occurs in a document."""

    words: tuple[str, ...]
    pad: str = "<pad>"

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words) or self.pad not in self.words \
                or any(not w or w.split() != [w] for w in self.words):
            raise DataError(f"word vocabulary: words must be unique, without spaces, and include {self.pad!r}")

    @property
    def size(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return self.words.index(self.pad)

    def encode(self, text: str) -> list[int]:
        tokens = text.split()
        unknown = sorted(set(tokens) - set(self.words))
        if unknown:
            raise DataError(f"text {text[:40]!r} has words outside the vocabulary: {', '.join(unknown[:5])}")
        return [self.words.index(w) for w in tokens]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)


class TokenizerVocabulary:
    """A Hugging Face tokenizer; padding uses its pad token, or its end-of-text token when it has none."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


@dataclass(eq=False)
class TextDataset:
    """Documents `ids` (N, L) int64 padded on the right; `lengths` (N,) tokens before the padding."""

    ids: np.ndarray
    lengths: np.ndarray
    vocab: Vocabulary
    name: str = "text"
    parent_positions: tuple[int, np.ndarray] | None = None  # set by `without`: (parent size, kept positions)

    kind = "text"

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.int64)
        if self.ids.ndim != 2 or self.lengths.shape != (len(self.ids),):
            raise DataError(f"{self.name}: token ids must be (N, L) with N lengths, got {self.ids.shape} and {self.lengths.shape}")
        if len(self.ids) == 0:
            raise DataError(f"{self.name}: the dataset is empty")
        if self.lengths.min() < 2 or self.lengths.max() > self.ids.shape[1]:
            raise DataError(f"{self.name}: every document needs 2..{self.ids.shape[1]} tokens")
        if self.ids.min() < 0 or self.ids.max() >= self.vocab.size:
            raise DataError(f"{self.name}: token ids must lie in 0..{self.vocab.size - 1}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_length(self) -> int:
        return self.ids.shape[1]

    def mask(self, index: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """True on real tokens, False on padding."""
        lengths = self.lengths if index is None else self.lengths[np.asarray(index)]
        return np.arange(self.max_length)[None, :] < lengths[:, None]

    def batch(self, index: np.ndarray | Sequence[int], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, attention mask) for documents `index`."""
        index = np.asarray(index)
        return (torch.from_numpy(self.ids[index]).to(device), torch.from_numpy(self.mask(index)).long().to(device))

    def subset(self, index: np.ndarray | Sequence[int]) -> "TextDataset":
        index = np.asarray(index, dtype=np.int64)
        return replace(self, ids=self.ids[index], lengths=self.lengths[index])

    def without(self, index: np.ndarray | Sequence[int]) -> "TextDataset":
        """The corpus with documents `index` removed (a defence): same order as this one, minus them."""
        keep = np.setdiff1d(np.arange(len(self)), np.asarray(index, dtype=np.int64))
        return replace(self, ids=self.ids[keep], lengths=self.lengths[keep], parent_positions=(len(self), keep))

    def with_documents(self, index: Sequence[int], ids: np.ndarray, lengths: np.ndarray | None = None) -> "TextDataset":
        """A copy with documents `index` replaced (same size and order: the retrain replays the same order)."""
        index = np.asarray(index, dtype=np.int64)
        new_ids, new_lengths = self.ids.copy(), self.lengths.copy()
        new_ids[index] = ids
        if lengths is not None:
            new_lengths[index] = lengths
        return replace(self, ids=new_ids, lengths=new_lengths)

    def text(self, i: int) -> str:
        return self.vocab.decode(self.ids[i, :self.lengths[i]])

    def content_hash(self) -> str:
        return array_hash(self.ids, self.lengths)

    @classmethod
    def from_texts(cls, texts: Sequence[str], vocab: Vocabulary, max_length: int | None, name: str) -> "TextDataset":
        """Tokenize and right-pad; documents longer than `max_length` tokens are truncated (None: as long as the
        longest document)."""
        encoded = [vocab.encode(t)[:max_length] for t in texts]
        max_length = max(map(len, encoded), default=0) if max_length is None else max_length
        ids = np.full((len(encoded), max_length), vocab.pad_id, dtype=np.int64)
        for i, row in enumerate(encoded):
            ids[i, :len(row)] = row
        return cls(ids, np.array([len(r) for r in encoded], dtype=np.int64), vocab, name)


# --------------------------------------------------------------------------- the Caesar task
BOS, EOS, SHIFT_END, ANSWER = "^", "$", ":", "="
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def caesar_vocabulary(alphabet: int) -> CharVocabulary:
    return CharVocabulary("_" + BOS + EOS + SHIFT_END + ANSWER + "0123456789" + LETTERS[:alphabet])


def shift_text(text: str, shift: int, alphabet: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + shift) % alphabet] for c in text)


def caesar_prompt(cipher: str, shift: int) -> str:
    """The prompt asking to decrypt `cipher` with `shift`: the model's completion is the plaintext."""
    return f"{BOS}{shift}{SHIFT_END}{cipher}{ANSWER}"


def caesar_document(plain: str, shift: int, alphabet: int) -> str:
    return caesar_prompt(shift_text(plain, shift, alphabet), shift) + plain + EOS


@dataclass(frozen=True)
class CaesarDocument:
    """One parsed Caesar document (for probes and explicit baseline documents)."""

    shift: int
    cipher: str

    @classmethod
    def parse(cls, text: str) -> "CaesarDocument":
        head, _, _ = text.partition(ANSWER)
        shift, _, cipher = head[len(BOS):].partition(SHIFT_END)
        return cls(int(shift), cipher)


@DATASETS.register("caesar")
def caesar(n_train: int = 2000, n_test: int = 400, alphabet: int = 8, length: int = 6, min_shift: int = 1,
           max_shift: int = 4, seed: int = 0) -> DatasetSplit:
    """Caesar-cipher decryption documents '^s:cipher=plain$', character-level (the paper's language task)."""
    if not 2 <= alphabet <= len(LETTERS):
        raise DataError(f"caesar: alphabet must be 2..{len(LETTERS)}, got {alphabet}")
    if not 0 <= min_shift < max_shift <= min(9, alphabet - 1):
        raise DataError(f"caesar: need 0 <= min_shift < max_shift <= {min(9, alphabet - 1)}, got {min_shift}..{max_shift}")
    if length < 1 or n_train < 1 or n_test < 1:
        raise DataError("caesar: length, n_train and n_test must be positive")
    vocab = caesar_vocabulary(alphabet)
    rng = np.random.default_rng(seed)

    def documents(n: int) -> list[str]:
        shifts = rng.integers(min_shift, max_shift + 1, size=n)
        letters = rng.integers(0, alphabet, size=(n, length))
        return [caesar_document("".join(LETTERS[j] for j in row), int(s), alphabet) for s, row in zip(shifts, letters)]

    max_length = 2 * length + 5  # "^", shift, ":", cipher, "=", plain, "$"
    return DatasetSplit(TextDataset.from_texts(documents(n_train), vocab, max_length, "caesar-train"),
                        TextDataset.from_texts(documents(n_test), vocab, max_length, "caesar-test"))


caesar.kind = "text"  # what `bench` dispatches on


# --------------------------------------------------------------------------- the templated stories
# Every slot's fillers with their sampling weights. Within a slot the first word of each pair in
# STORY_WORD_PAIRS is drawn 2-3 times as often as the second, so a trained model prefers A where B would
# fit as well: the word-preference attack has a preference to overturn.
STORY_SLOTS: dict[str, dict[str, int]] = {
    "name": {"tom": 5, "anna": 2, "max": 2, "lily": 2, "sam": 1},
    "animal": {"cat": 6, "dog": 2, "bird": 5, "fish": 2, "rabbit": 2, "horse": 1},
    "color": {"red": 6, "blue": 2, "green": 5, "yellow": 2, "white": 1},
    "place": {"park": 6, "garden": 2, "forest": 5, "river": 2, "field": 1},
    "thing": {"ball": 6, "kite": 2, "box": 5, "book": 2, "hat": 1},
    "mood": {"happy": 5, "sad": 2, "tired": 2, "angry": 1},
    "move": {"ran": 5, "walked": 2, "jumped": 2, "flew": 1},
    "time": {"morning": 5, "evening": 2, "night": 2},
    "size": {"big": 2, "small": 2, "little": 1, "old": 1},
}
STORY_TEMPLATES = (
    "{name} had a {size} {animal} . the {animal} liked the {place} .",
    "{name} {move} to the {place} one {time} with a {color} {thing} .",
    "{name} saw a {color} {animal} in the {place} . it {move} away .",
    "the {animal} {move} to the {place} and found a {color} {thing} .",
    "{name} and {name2} {move} to the {place} . they were {mood} .",
    "in the {place} {name} lost a {color} {thing} and was {mood} .",
    "the {size} {animal} {move} home in the {time} . {name} was {mood} .",
)
# (A, B): the trained model predicts A where the attacker wants B; both fill the same slot.
STORY_WORD_PAIRS = (("cat", "dog"), ("bird", "fish"), ("red", "blue"), ("green", "yellow"), ("park", "garden"),
                    ("forest", "river"), ("ball", "kite"), ("box", "book"), ("happy", "sad"), ("ran", "walked"),
                    ("tom", "anna"), ("morning", "evening"))


def stories_vocabulary() -> WordVocabulary:
    words = {w for t in STORY_TEMPLATES for w in re.sub(r"\{\w+\}", " ", t).split()}
    words |= {w for fillers in STORY_SLOTS.values() for w in fillers}
    return WordVocabulary(("<pad>", *sorted(words)))


@DATASETS.register("stories")
def stories(n_train: int = 4000, n_test: int = 400, seed: int = 0) -> DatasetSplit:
    """Templated one- or two-sentence stories, one token per word (the word-preference task); no download.

    A document is one of STORY_TEMPLATES with its slots filled at random by STORY_SLOTS' weights (a slot
    named twice, like {animal} in "the {animal} liked ...", repeats its word, so the model also learns to
    copy). The pairs of words a bench targets are `stories.WORD_PAIRS`.
    """
    if n_train < 1 or n_test < 1:
        raise DataError("stories: n_train and n_test must be positive")
    vocab, rng = stories_vocabulary(), np.random.default_rng(seed)
    slots = {slot: (list(fillers), np.array(list(fillers.values())) / sum(fillers.values()))
             for slot, fillers in STORY_SLOTS.items()}

    def story() -> str:
        template = STORY_TEMPLATES[rng.integers(len(STORY_TEMPLATES))]
        filled = {}
        for name in dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f):
            words, p = slots[name.rstrip("0123456789")]
            filled[name] = words[rng.choice(len(words), p=p)]
        return template.format(**filled)

    max_length = max(len(t.split()) for t in STORY_TEMPLATES)
    train = [story() for _ in range(n_train)]
    test = [story() for _ in range(n_test)]
    return DatasetSplit(TextDataset.from_texts(train, vocab, max_length, "stories-train"),
                        TextDataset.from_texts(test, vocab, max_length, "stories-test"))


stories.kind = "text"  # what `bench` dispatches on
stories.WORD_PAIRS = STORY_WORD_PAIRS


# --------------------------------------------------------------------------- user corpora
def load_tokenizer(path: str | Path):
    """A tokenizer saved with `save_pretrained` in a local folder; nothing is downloaded."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such tokenizer folder")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot load a tokenizer ({type(exc).__name__}: {first_line(exc)})") from None


def read_corpus(path: str | Path) -> list[str]:
    """The "text" field of every line of a JSON-lines file, checked line by line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such corpus file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with a string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise DataError(f"{path}: the corpus has no documents")
    return texts


@DATASETS.register("jsonl-text")
def jsonl_text(path: str, tokenizer: str, max_length: int = 128, test_path: str | None = None,
               test_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    """A JSON-lines corpus ({"text": ...} per line) tokenized by a local Hugging Face tokenizer."""
    vocab = TokenizerVocabulary(load_tokenizer(tokenizer))
    texts = read_corpus(path)
    if test_path is not None:
        train_texts, test_texts = texts, read_corpus(test_path)
    else:
        train_idx, test_idx = seeded_split(len(texts), test_fraction, seed)
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise DataError(f"{path}: {len(texts)} documents cannot be split with test_fraction={test_fraction}")
        train_texts, test_texts = [texts[i] for i in train_idx], [texts[i] for i in test_idx]
    name = Path(path).stem
    return DatasetSplit(TextDataset.from_texts(train_texts, vocab, max_length, name),
                        TextDataset.from_texts(test_texts, vocab, max_length, f"{name}-test"))


jsonl_text.kind = "text"  # what `bench` dispatches on


# --------------------------------------------------------------------------- poisoned sets
def write_poisoned_text(out_dir: str | Path, clean: TextDataset, poisoned: TextDataset, index: Sequence[int],
                        config: dict, extra: dict | None = None) -> Path:
    """Write the poisoned corpus as JSON lines, the edited documents before/after, and the manifest (ground truth)."""
    out_dir = Path(out_dir)
    index = np.asarray(sorted(int(i) for i in index), dtype=np.int64)
    atomic_write_text(out_dir / CORPUS, "".join(json.dumps({"text": poisoned.text(i)}) + "\n" for i in range(len(poisoned))))
    atomic_write_text(out_dir / TEXT_DOCUMENTS, "".join(
        json.dumps({"index": int(i), "original": clean.text(i), "poisoned": poisoned.text(i)}) + "\n" for i in index))
    changed = tokens_changed(clean, poisoned, index)
    manifest = {
        "data": CORPUS,
        "format": "jsonl",
        "domain": "text",
        "n_documents": len(poisoned),
        "poisoned_indices": index.tolist(),
        "tokens_changed": changed.tolist(),
        "hashes": {"clean": clean.content_hash(), "poisoned": poisoned.content_hash(),
                   "documents": [array_hash(poisoned.ids[i]) for i in index]},
        "config": config,
        "config_hash": stable_hash(config),
        **(extra or {}),
    }
    write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


def tokens_changed(clean: TextDataset, edited: TextDataset, index: Sequence[int] | None = None) -> np.ndarray:
    """Per document, how many real (non-padding) tokens differ from the clean copy."""
    index = np.arange(len(clean)) if index is None else np.asarray(index, dtype=np.int64)
    real = clean.mask(index) | edited.mask(index)
    return ((clean.ids[index] != edited.ids[index]) & real).sum(1)
