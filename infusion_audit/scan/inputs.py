"""What `scan()` and the `scan` command accept, checked and converted: image arrays or a torch Dataset into an
ImageDataset, a behaviour, a model that must fit the data, a suspect file, a ground-truth manifest."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..behaviour import ClassBehaviour
from ..data import (ImageDataset, images_from_arrays, load_suspect, png_shape, read_manifest, read_npy, read_npz,
                    read_png, unit_float_images)
from ..errors import DataError, UserError
from ..runtime import model_device
from ..text.behaviours import WordPairTarget, word_preference_target
from ..text.data import TextDataset, TokenizerVocabulary, load_tokenizer, read_corpus
from ..text.pipeline import TextBehaviour

log = logging.getLogger(__name__)

# Above this many classes the labels are more likely garbage than a real label set.
MAX_CLASSES = 1000


# --------------------------------------------------------------------------- what scan() accepts
GREY_OR_RGB = (1, 3)  # channel counts that tell an image layout from its shape


def as_dataset(data: Any, y: Any = None, *, channels_last: bool | None = None, num_classes: int | None = None,
               what: str = "data", progress: bool = False, tokenizer: Any = None, max_length: int | None = None,
               positions: int | None = None) -> Any:
    """What `scan` accepts as documents (see its docstring), as an ImageDataset or a TextDataset, checked as the
    command line checks a file. With a `tokenizer`, `data` is text (see `as_text_dataset`)."""
    if tokenizer is not None and not isinstance(data, TextDataset):
        if y is not None:
            raise UserError(f"{what}: text documents have no labels; pass y only with image arrays")
        return check_suspect(as_text_dataset(data, tokenizer, max_length, positions, what), None, what, what)
    if isinstance(data, (str, Path)) and Path(data).suffix == ".jsonl":
        raise UserError(f"{what}: {data} is a text corpus; pass tokenizer= (the tokenizer its model was trained with)")
    if isinstance(data, (str, Path)) or (hasattr(data, "kind") and hasattr(data, "batch")):
        if y is not None:
            raise UserError(f"{what}: labels come with the dataset; pass y only with image arrays")
        if isinstance(data, (str, Path)):
            return checked_suspect(data, num_classes, what)
        return check_suspect(data, num_classes, data.name, what)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if y is None:
            raise UserError(f"{what}: image arrays need their labels, scan(x, y, ...)")
        name, x, labels = f"{what} arrays", _numpy(data, what), _numpy(y, f"{what} labels")
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__getitem__"):
        if y is not None:
            raise UserError(f"{what}: labels come with the dataset; pass y only with image arrays")
        name = f"{what} ({type(data).__name__})"
        x, labels = _from_torch_dataset(data, name, progress)
    else:
        raise UserError(f"{what}: expected image arrays x and y, a map-style torch Dataset of (input, label) pairs, "
                        f"an ImageDataset or TextDataset, or a path; got {type(data).__name__}")
    images = images_from_arrays(_channels_first(x, channels_last, name), labels, name=name, num_classes=num_classes)
    return check_suspect(images, num_classes, name, what)


def as_text_dataset(data: Any, tokenizer: Any, max_length: int | None = None, positions: int | None = None,
                    what: str = "data") -> TextDataset:
    """Text documents as a TextDataset: `data` a JSON-lines path ({"text": ...} per line), or a sequence or
    iterable (a `datasets.Dataset`, a generator) of strings or of mappings with a "text" string; `tokenizer` a
    Hugging Face tokenizer, a folder saved with `save_pretrained`, or a `Vocabulary`. `max_length` (default: the
    longest document, at most the model's `positions`, cutting longer ones with a warning) pads and cuts."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    vocab = tokenizer if all(hasattr(tokenizer, a) for a in ("size", "pad_id", "encode", "decode")) \
        else TokenizerVocabulary(tokenizer) if callable(tokenizer) and hasattr(tokenizer, "decode") else None
    if vocab is None:
        raise UserError(f"tokenizer: expected a Hugging Face tokenizer or its folder, got {type(tokenizer).__name__}")
    if isinstance(data, (str, Path)):
        texts, name = read_corpus(data), Path(data).stem
    else:
        if isinstance(data, (np.ndarray, torch.Tensor)) or not hasattr(data, "__iter__"):
            raise UserError(f"{what}: expected text documents (strings, mappings with a 'text' string, or a "
                            f".jsonl path), got {type(data).__name__}")
        texts, name = [], f"{what} ({type(data).__name__})"
        for i, item in enumerate(data):
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise DataError(f"{what}: item {i} is a {type(item).__name__}, expected a string or a mapping with a "
                                "'text' string")
            texts.append(text)
        if not texts:
            raise DataError(f"{what}: there are no documents")
    if max_length is not None and positions is not None and max_length > positions:
        raise UserError(f"max_length: {max_length} is more than the {positions} positions the model takes")
    data = TextDataset.from_texts(texts, vocab, max_length, name)
    if max_length is None and positions is not None and data.max_length > positions:
        log.warning("%s: %d documents are longer than the %d positions the model takes; each is scanned cut to "
                    "them", what, int((data.lengths > positions).sum()), positions)
        data = TextDataset(data.ids[:, :positions], np.minimum(data.lengths, positions), vocab, name)
    return data


def _numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{name}: not an array ({str(exc).splitlines()[0][:120]})") from None


def _channels_first(x: np.ndarray, channels_last: bool | None, name: str) -> np.ndarray:
    """(N, H, W, C) images as (N, C, H, W); anything but 4 axes is left to the shape check."""
    if x.ndim != 4:
        return x
    if channels_last is None:
        first, last = x.shape[1] in GREY_OR_RGB, x.shape[3] in GREY_OR_RGB
        if first == last:
            raise DataError(f"{name}: cannot tell whether images of shape {x.shape} are (N, C, H, W) or "
                            "(N, H, W, C); pass channels_last=False or True")
        channels_last = last
    return x.transpose(0, 3, 1, 2) if channels_last else x


def _from_torch_dataset(dataset: Any, name: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, label) item of a map-style dataset, inputs stacked (one shape and dtype for all)."""
    try:
        n = len(dataset)
    except TypeError:
        raise UserError(f"{name}: has no length; scan needs a map-style Dataset (items 0..N-1)") from None
    if n == 0:
        raise DataError(f"{name}: the dataset is empty")
    x, labels = None, []
    for i in tqdm(range(n), desc="reading dataset", unit="doc", disable=not progress, leave=False):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{name}: item {i} is a {type(item).__name__}, expected an (input, label) pair")
        inp, label = _numpy(item[0], f"{name} item {i}"), _numpy(item[1], f"{name} item {i} label")
        if x is None:
            x = np.empty((n, *inp.shape), dtype=inp.dtype)
        if inp.shape != x.shape[1:] or inp.dtype != x.dtype:
            raise DataError(f"{name}: item {i} has an input of shape {inp.shape} and dtype {inp.dtype}, item 0 "
                            f"{x.shape[1:]} and {x.dtype}; every input must be alike")
        if label.size != 1:
            raise DataError(f"{name}: item {i} has a label of shape {label.shape}, expected one class number")
        x[i] = inp
        labels.append(label.reshape(()))
    return x, np.stack(labels)


def as_behaviour(behaviour: Any, data: Any, probes: int = 32) -> Any:
    """A ClassBehaviour from an (input, class) pair, checked against the data; for text, a word preference from
    a (word_a, word_b) pair: B predicted where a model predicts A, probed on up to `probes` of the data's
    prefixes that end right before A."""
    if behaviour is None:
        return behaviour
    if data.kind == "text":
        if isinstance(behaviour, (tuple, list)) and len(behaviour) == 2 and all(isinstance(w, str) for w in behaviour):
            target = WordPairTarget(*behaviour)
            return TextBehaviour(word_preference_target(data, target, probes),
                                 description=f"{target.word_b!r} predicted where {target.word_a!r} would be")
        if not hasattr(behaviour, "measure"):
            raise UserError("behaviour: for text, expected a (word_a, word_b) pair or a text behaviour")
        return behaviour
    if data.kind != "image":
        return behaviour
    if not isinstance(behaviour, ClassBehaviour):
        try:
            x, cls = behaviour
            x, cls = _numpy(x, "behaviour input"), int(cls)
        except (TypeError, ValueError):
            raise UserError("behaviour: expected a ClassBehaviour or an (input, class) pair") from None
        x = unit_float_images(x, "behaviour input")[0]
        behaviour = ClassBehaviour(x.reshape(data.input_shape) if x.ndim == 2 and data.input_shape[0] == 1 else x, cls,
                              f"an input classified as {cls}")
    if tuple(np.shape(behaviour.x)) != data.input_shape or not np.isfinite(behaviour.x).all():
        raise DataError(f"behaviour: input has shape {tuple(np.shape(behaviour.x))}, the data's documents "
                        f"{data.input_shape} (and must be finite)")
    if not 0 <= behaviour.cls < data.num_classes:
        raise DataError(f"behaviour: class {behaviour.cls} is not one of the data's {data.num_classes} classes")
    return behaviour


def check_model(model: Any, data: Any) -> None:
    """A torch module that takes two of the data's images and returns one logit per class, or one line why not."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected a torch nn.Module trained on the data, got {type(model).__name__}")
    if data.kind == "text":
        return _check_language_model(model, data)
    if data.kind != "image":
        return
    x, _ = data.batch(np.arange(2), model_device(model))
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure here is the model not fitting the data
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DataError(f"model {type(model).__name__} cannot take the data's images, float32 batches of shape "
                        f"(N, {', '.join(map(str, data.input_shape))}): {type(exc).__name__}: {first}") from None
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < data.num_classes:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"model {type(model).__name__} returned {got} for 2 images; expected logits of shape "
                        f"(2, {data.num_classes}), one per class")




def _check_language_model(model: nn.Module, data: TextDataset) -> None:
    """A causal LM with a token embedding for every token of the data's tokenizer, taking two of its documents."""
    if not hasattr(model, "get_input_embeddings"):
        raise UserError(f"model: a text corpus needs a transformers causal LM, got {type(model).__name__}")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < data.vocab.size:
        raise DataError(f"model {type(model).__name__} has {rows} token embeddings, the tokenizer {data.vocab.size} "
                        "tokens: give the tokenizer the model was trained with")
    ids, mask = data.batch(np.arange(2), model_device(model))
    model.eval()
    with torch.no_grad():
        logits = getattr(model(input_ids=ids, attention_mask=mask), "logits", None)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape[:2]) != (2, data.max_length):
        raise DataError(f"model {type(model).__name__} did not return next-token logits (2, {data.max_length}, "
                        "vocabulary) for 2 documents")


BEHAVIOUR_FORMAT = "FILE[:INDEX]:CLASS (an image file .png/.npy, or an .npz whose x[INDEX] is the input)"


def parse_behaviour(spec: str, like: ImageDataset) -> Any:
    """`FILE[:INDEX]:CLASS` -> ClassBehaviour: the input a suspicious prediction was made on, and its class."""
    m = re.fullmatch(r"(.+?)(?::(\d+))?:(\d+)", spec)
    if not m:
        raise UserError(f"--behaviour {spec!r}: expected {BEHAVIOUR_FORMAT}")
    path, index, cls = Path(m.group(1)), m.group(2), int(m.group(3))
    if cls >= like.num_classes:
        raise UserError(f"--behaviour {spec!r}: class {cls} is not one of the data's {like.num_classes} classes")
    if path.suffix == ".npy":
        x = unit_float_images(read_npy(path), str(path))[0]
    elif path.suffix == ".png":
        png_shape(path)
        x = read_png(path, like.input_shape[0]).astype(np.float32) / 255.0
    else:  # a behaviour needs no labels: an .npz need hold only x
        holder = unit_float_images(read_npz(path, ("x",))["x"], str(path))[0] if path.is_file() \
            else load_suspect(path).x
        if holder.ndim not in (3, 4):
            raise DataError(f"{path}: x must have shape (N, C, H, W) or (N, H, W), got {holder.shape}")
        i = int(index or 0)
        if i >= len(holder):
            raise UserError(f"--behaviour {spec!r}: index {i} is outside {path} ({len(holder)} documents)")
        x = holder[i]
    x = x.reshape(x.shape[-3:]) if x.ndim >= 3 else x[None]
    if tuple(x.shape) != like.input_shape or not np.isfinite(x).all():
        raise DataError(f"--behaviour {spec!r}: input has shape {tuple(x.shape)}, the data's documents "
                        f"{like.input_shape} (and must be finite)")
    return ClassBehaviour(x, cls, f"{path.name}{'[' + index + ']' if index else ''} classified as {cls}")


def read_truth(path: str | Path, n: int) -> list[int]:
    manifest = read_manifest(path)
    if manifest.get("n_documents", n) != n:
        raise DataError(f"{path}: manifest describes {manifest['n_documents']} documents, the data has {n}")
    indices = manifest["poisoned_indices"]
    if not all(isinstance(i, int) and 0 <= i < n for i in indices):
        raise DataError(f"{path}: poisoned_indices must be document positions in 0..{n - 1}")
    return indices


def checked_suspect(path: str | Path, num_classes: int | None, what: str = "data") -> ImageDataset:
    return check_suspect(load_suspect(path), num_classes, str(path), what)


def check_suspect(data: Any, num_classes: int | None, name: str, what: str = "data") -> Any:
    """A dataset to scan: image labels within `num_classes` (which it then takes), a plausible number of
    classes otherwise, and at least 2 documents."""
    if data.kind == "image" and num_classes is not None and num_classes != data.num_classes:
        if int(data.y.max()) >= num_classes:
            raise DataError(f"{name}: labels must lie in 0..{num_classes - 1}, found up to {int(data.y.max())}")
        names = data.class_names if len(data.class_names) == num_classes else []
        data = dataclasses.replace(data, num_classes=num_classes, class_names=names)
    elif data.kind == "image" and data.num_classes > MAX_CLASSES:
        raise DataError(f"{name}: labels reach {data.num_classes - 1}; more than {MAX_CLASSES} classes looks "
                        f"like corrupt labels (pass num_classes / --num-classes if they are real)")
    if len(data) < 2:
        raise DataError(f"{name}: {what} holds {len(data)} document; a scan needs at least 2")
    return data

