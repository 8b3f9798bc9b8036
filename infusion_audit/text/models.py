"""Causal language models (Hugging Face transformers) and their training loss.

Models are plain `transformers` causal LMs, so a user's own checkpoint folder works unchanged. The loss
is written once for token ids and once for relaxed one-hot rows (the attack's continuous view of a
document); both are the same function of the document, with padding masked out.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, UserError, first_line
from ..models import build_model
from ..registry import MODELS

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' own loading bars and warnings inside the block (restored after): loading reports
    through this package's logging, so `-q` and `progress=False` are quiet, and what matters about a folder
    (missing weights, too few positions) is checked here and said in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@MODELS.register("tiny-gpt-neo")
def tiny_gpt_neo(vocab_size: int, max_length: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int | None = None) -> nn.Module:
    """A small GPT-Neo configured in code and trained from scratch (the Caesar task's model); no dropout."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=vocab_size, max_position_embeddings=max_length, hidden_size=hidden, num_layers=layers,
        num_heads=heads, attention_types=[[["global"], layers]], intermediate_size=intermediate or 4 * hidden,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    return GPTNeoForCausalLM(config)


@MODELS.register("hf-local")
def hf_local(vocab_size: int, max_length: int, path: str) -> nn.Module:
    """A Hugging Face causal LM saved with `save_pretrained` (safetensors) in a local folder; nothing downloads."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such model folder")
    log.info("loading the causal LM in %s", folder)

    def load(**options):
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                        output_loading_info=True, **options)

    try:
        try:
            model, info = load()
        except ImportError as exc:  # the attention kernel config.json names is not installed here
            log.warning("%s: %s; loading it with eager attention", folder, str(exc).splitlines()[0][:160].rstrip("."))
            model, info = load(attn_implementation="eager")
    except Exception as exc:
        raise DataError(f"{folder}: cannot load a safetensors causal LM ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    unfilled = sorted(info["missing_keys"])  # a tensor of the wrong shape is refused by transformers itself
    if unfilled:
        raise DataError(f"{folder}: the weights file does not fill {len(unfilled)} of the model's parameters "
                        f"(e.g. {unfilled[0]}); they would start at random")
    embeddings = model.get_input_embeddings().weight.shape[0]
    if embeddings < vocab_size:
        raise DataError(f"{folder}: the model has {embeddings} token embeddings, the tokenizer {vocab_size}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and positions < max_length:
        raise DataError(f"{folder}: the model takes {positions} positions, the dataset's max_length is {max_length}")
    return model


def model_positions(spec) -> int | None:
    """How many positions the model a spec names takes, read from an hf-local folder's config.json (no weights
    are loaded); None when the spec builds its model to fit the data (tiny-gpt-neo, a user's factory)."""
    from transformers import AutoConfig

    if spec.name != "hf-local" or not Path(str(spec.params.get("path", ""))).is_dir():
        return None  # hf_local itself says what is wrong with the folder
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(spec.params["path"]), local_files_only=True)
    except Exception:  # an unreadable config.json is hf_local's one-line error, not this check's
        return None
    return getattr(config, "max_position_embeddings", None)


def build_text_model(spec, vocab_size: int, max_length: int) -> nn.Module:
    """A text model plugin (or a user's ``package.module:callable``): a transformers causal LM."""
    model = build_model(spec, vocab_size=vocab_size, max_length=max_length)
    if not hasattr(model, "get_input_embeddings"):
        raise UserError(f"model {spec.name!r} returned {type(model).__name__}, expected a transformers causal LM")
    return model


def _masked_mean(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per document, the mean over its predicted (non-padding) tokens."""
    target_mask = mask[:, 1:].to(token_loss.dtype)
    return (token_loss * target_mask).sum(1) / target_mask.sum(1).clamp_min(1)


def document_losses(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per document, the mean next-token cross-entropy over its real tokens (padding masked out)."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    token_loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return _masked_mean(token_loss, mask)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The training loss: mean over documents of `document_losses` (so one document's gradient is its own term)."""
    return document_losses(model, batch).mean()


def relaxed_document_losses(model: nn.Module, onehot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`document_losses` of relaxed documents: rows of `onehot` (N, L, V) are distributions over the model's V tokens.

    The rows enter twice, as inputs (through the embedding matrix) and as soft next-token targets,
    so at a one-hot point this equals the loss of the real document.
    """
    weight = model.get_input_embeddings().weight
    logits = model(inputs_embeds=onehot.to(weight.dtype) @ weight, attention_mask=mask).logits[:, :-1]
    token_loss = -(onehot[:, 1:] * torch.log_softmax(logits, -1)).sum(-1)
    return _masked_mean(token_loss, mask)
