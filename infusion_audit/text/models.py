"""Causal language models (Hugging Face transformers) and their training loss.

Models are plain `transformers` causal LMs, so a user's own checkpoint folder works unchanged. The loss
is written once for token ids and once for relaxed one-hot rows (the attack's continuous view of a
document); both are the same function of the document, with padding masked out.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, UserError, first_line
from ..models import build_model
from ..registry import MODELS


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
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise DataError(f"{folder}: cannot load a safetensors causal LM ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    embeddings = model.get_input_embeddings().weight.shape[0]
    if embeddings < vocab_size:
        raise DataError(f"{folder}: the model has {embeddings} token embeddings, the tokenizer {vocab_size}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and positions < max_length:
        raise DataError(f"{folder}: the model takes {positions} positions, the dataset's max_length is {max_length}")
    return model


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
