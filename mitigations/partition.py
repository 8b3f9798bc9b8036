"""Deep partition aggregation (Levine & Feizi, ICLR 2021): `parts` models on disjoint shards, a
majority vote, and a certificate per input.

Shards are chosen by a hash of each document's content (SHA-256 of its arrays: the image and its
label; token ids and length for text), as DPA does, not by its position. What the certificate needs
is that a document's shard depends on that document alone: then inserting or removing a document
changes one shard and editing one changes at most two (the shard it leaves and the one it joins),
whatever the attacker chose. A position-based split (index mod parts) would keep an edited document
in its shard (one shard per edit, a radius twice as large) but a single insertion or removal would
shift every later document into another shard, so it certifies nothing against those; and the
attacker chooses positions as freely as contents. Hashing does not stop an attacker from picking a
shard (trying a few variants of a poison finds any shard); the edit radius counts that worst case.
The label is part of the hashed content: hashing the input alone (SS-DPA's choice against attackers
who only flip labels) would keep a relabelled document in its shard, but here a label flip is an edit
like any other, so one radius covers every attack the bench runs.

Each member trains on its shard in an order fixed by the documents' hashes, so it is a function of
its shard's contents only (untouched shards give bit-identical members in a poisoned retrain and its
control). A member whose shard is empty is the untrained start, so the vote never depends on which
shards happen to be empty.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from infusion_audit.errors import ConfigError, UserError
from infusion_audit.registry import MITIGATIONS
from infusion_audit.training import Checkpoint, Retrained

from .base import Fit, Mitigation, check_param, until_epoch

HASH = "SHA-256 of each document's arrays (image and label; token ids and length)"
Change = Literal["edit", "insert-remove"]


def document_hashes(dataset: Any) -> list[str]:
    """Each document's content hash: the library's dataset hash of a one-document subset."""
    return [dataset.subset([i]).content_hash() for i in range(len(dataset))]


def shard_of(hashes: list[str], parts: int) -> np.ndarray:
    return np.array([int(h, 16) % parts for h in hashes], dtype=np.int64)


def shard_dataset(dataset: Any, members: np.ndarray) -> Any:
    """Documents `members` as a dataset of their own (not a removal from `dataset`: its order must not
    depend on the documents outside the shard)."""
    shard = dataset.subset(members)
    if getattr(shard, "parent_positions", None) is not None:
        shard = dataclasses.replace(shard, parent_positions=None)
    return shard


class VoteEnsemble(nn.Module):
    """The members' majority vote, ties to the lower class, as a classifier.

    Its scores are log(s_c / Σ s) with s_c = n_c + τ·(C − c + p̄_c) / (C·(C + 1)), where n_c counts the
    members voting c, p̄_c is their mean softmax and τ = 1/2. The added term lies in (0, 1/(2C)], so it
    never outweighs one vote, and among tied counts it is larger for the lower class (C − c drops by 1
    while p̄ moves by less), so argmax is exactly the vote. Softmax of the scores is the vote share to
    within 1/(3·members) (the added terms sum to under 1/3), finite (and slightly graded by p̄) for
    classes that got no vote.
    """

    tie_weight = 0.5

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @torch.no_grad()
    def tally(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(votes per class (N, C) as integers, mean member softmax (N, C))."""
        probs = torch.stack([torch.softmax(m(x), -1) for m in self.members])
        if probs.ndim != 3:
            raise UserError(f"partition votes over class scores (N, classes); its members output shape "
                            f"{tuple(probs.shape[1:])}")
        votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0)
        return votes, probs.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        votes, mean_p = self.tally(x)
        classes = votes.shape[-1]
        rank = classes - torch.arange(classes, device=votes.device, dtype=mean_p.dtype)  # C - c
        score = votes + self.tie_weight * (rank + mean_p) / (classes * (classes + 1))
        return torch.log(score / score.sum(-1, keepdim=True))

    def certified_radius(self, x: torch.Tensor, change: Change = "edit") -> torch.Tensor:
        """Per input (N,): how many training documents may be edited (`edit`), or inserted or removed
        (`insert-remove`), without changing the vote. DPA's gap counts each rival's votes plus one if it
        would win a tie; a changed member moves the gap by at most 2, so floor(gap / 2) members may change:
        that many insertions or removals, and half as many edits (each reaches up to two shards)."""
        if change not in ("edit", "insert-remove"):
            raise UserError(f"certified radius: change must be 'edit' or 'insert-remove', got {change!r}")
        votes, _ = self.tally(x)
        vote = votes.argmax(-1)  # the first maximum: ties go to the lower class
        classes = torch.arange(votes.shape[-1], device=votes.device)
        rival = votes + (classes[None, :] < vote[:, None]).long()
        rival[torch.arange(len(vote)), vote] = torch.iinfo(torch.long).min
        gap = votes.gather(1, vote[:, None])[:, 0] - rival.max(-1).values
        return gap // 2 if change == "insert-remove" else gap // 4


@MITIGATIONS.register("partition")
class Partition(Mitigation):
    """Deep partition aggregation: models on disjoint content-hashed shards, majority vote, certified radius."""

    name = "partition"

    def __init__(self, parts: int = 10, epochs: int | None = None):
        # a member sees 1/parts of the documents, so it takes 1/parts of the steps per epoch: retrained from
        # scratch it needs about `parts` times the recipe's epochs (digits, 10 parts: test accuracy 0.19 after
        # the recipe's 10 epochs, 0.95 after 50). None: the victim's retrain's epochs.
        self.parts, self.epochs = parts, epochs
        check_param(self.name, "parts", parts, "an integer >= 2",
                    isinstance(parts, int) and not isinstance(parts, bool) and parts >= 2)
        check_param(self.name, "epochs", epochs, "an integer >= 1 or null", epochs is None or (
            isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1))

    def shards(self, dataset: Any) -> np.ndarray:
        """Each document's shard (0..parts-1), from its content alone."""
        return shard_of(document_hashes(dataset), self.parts)

    def retrain(self, fit: Fit, new_model: Callable[[], nn.Module], dataset: Any, start: Checkpoint | None = None,
                epochs: int | None = None) -> Retrained:
        if self.parts > len(dataset):
            raise ConfigError(f"mitigation {self.name!r}", "parts", f"at most the {len(dataset)} training documents",
                              self.parts)
        hashes = document_hashes(dataset)
        shard = shard_of(hashes, self.parts)
        last = until_epoch(start, self.epochs if self.epochs is not None else epochs)
        members, sizes = [], []
        for j in range(self.parts):
            index = np.flatnonzero(shard == j)
            index = index[np.argsort([hashes[i] for i in index], kind="stable")]  # an order fixed by content
            model = new_model()
            if len(index):
                model = fit(model, shard_dataset(dataset, index), start=start, until_epoch=last)
            elif start is not None:
                model.load_state_dict(start.model)
            members.append(model.eval())
            sizes.append(len(index))
        trained = members[int(np.argmax(sizes))]  # an untrained member of an empty shard joins it on its device
        ensemble = VoteEnsemble(members).to(next(trained.parameters()).device).eval()
        figures = {"parts": self.parts, "member_epochs": self.epochs if self.epochs is not None else epochs,
                   "hash": HASH, "shard_size_min": min(sizes), "shard_size_max": max(sizes),
                   "empty_shards": sizes.count(0),
                   "certificate": ("against changes to the training documents, every member starting from the same "
                                   + (f"checkpoint (epoch {start.epoch})" if start is not None else "initialisation"))}
        return Retrained(ensemble, figures, per_input=lambda x: self.input_figures(ensemble, x))

    @staticmethod
    def input_figures(ensemble: VoteEnsemble, x: torch.Tensor) -> dict:
        device = next(ensemble.parameters()).device
        batch = x.unsqueeze(0).to(device)
        votes, _ = ensemble.tally(batch)
        return {"votes": votes[0].tolist(), "vote": int(votes[0].argmax()),
                "certified_radius_edit": int(ensemble.certified_radius(batch, "edit")[0]),
                "certified_radius_insert_remove": int(ensemble.certified_radius(batch, "insert-remove")[0])}
