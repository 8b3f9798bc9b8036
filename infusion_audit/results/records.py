"""The records a run appends to results.jsonl, one JSON line each, typed and versioned.

Every record is built here (its constructor) and read back here (`Record.from_dict`), so the schema below is
the one place it is written down. A line holds `kind`, `schema` (the version it was written under) and the
record's fields; a field left None is not written. Fields this schema does not name (a behaviour's own
figures, a fixture's note) are kept in `extra` and written flat beside the named ones.

Schema 2 (this one) differs from schema 1 (records without `schema`) in one name: the dataset's name is
`dataset` (schema 1: `scenario`). Schema-1 records still load, renamed.

Units: p is a probability; log-odds are in nats; accuracies (`acc_*`, the pipeline's task figure on its test
set, accuracy for images) are fractions in [0, 1]; seconds are wall time. A *detection figure* is
{"value", "lo", "hi", "n"}: a rate in [0, 1] with its bootstrap CI over n documents (None bounds without one).

Every kind (* marks what the readers cannot do without; each kind lists what it requires):

    field          unit / type            meaning
    cell           str                    hash of what produced the poisoning (the unit resumed and paired on)
    dataset        str                    the dataset's name (schema 1: scenario)
    attack         str                    the attack plugin's name
    variant        str                    the arm's label beside the attack (a transfer victim's: "... → victim")
    budget         dict                   k (documents edited), eps and norm (the bound, None when unbounded),
                                          quantize (bool), tokens (text: tokens changed per document, if set)
    target         dict                   the behaviour attacked (images: index, true, class; text: the pair)
    seed           int                    the attack seed of the cell
    victim         str                    the model retrained (bench only: its name, params hashed)

AttackRecord ("attack"): the poisoning's effect on one victim against its clean control.
Requires attack*, budget*, delta_p*, delta_logodds*.

    domain         "image" | "text"       picks the log-odds definition shown
    params         dict                   the attack's parameters
    repeat         int                    the repeat of the cell (only when an arm repeats)
    p_before       p                      p(target) on the attacker's model, before any retraining
    p_control      p                      p(target) on the clean control (same checkpoint, order and seed)
    p_poisoned     p                      p(target) on the model retrained on the poisoned set
    delta_p        p                      p_poisoned - p_control
    logodds_control, logodds_poisoned     nats   log-odds of the target on the control / poisoned model
    delta_logodds  nats                   logodds_poisoned - logodds_control: the success measure
    top1_control, top1_poisoned  bool     the target is the top-1 prediction (text: most probes hit greedily)
    flip           bool                   top-1 on the poisoned model and not on the control
    acc_control, acc_poisoned  fraction   task figure of the control / poisoned model
    norms          dict                   mean linf, l2, values_changed per edited document; off_grid,
                                          out_of_range: values off the storage grid or the value range
    poisoned_indices  list[int]           the documents edited
    artefact       str                    the poisoned set's folder, relative to the run directory
    timings        dict[str, seconds]     per stage: the attack's own (select, pgd, ...), craft, retrain; ihvp,
                                          scores (once per target), factors_shared, control_shared
    predicted_delta_f  float              the attack's own prediction of the change of f, when it makes one
    asr_before, asr_control, asr_poisoned  fraction   a backdoor's attack success rate: the share of the triggered
                                          test images of the other classes classified as the target class, on the
                                          attacker's model / the clean control / the poisoned model (p, logodds
                                          and top1 are then the mean p(target) and log-odds over those images and
                                          whether most of them reach it)
    delta_asr      fraction               asr_poisoned - asr_control: a backdoor's success measure
    triggered      int                    the number of triggered test images the ASR is taken over
    <figure>_before, <figure>_control, <figure>_poisoned (extra)   a behaviour's other figures (text:
                                          logprob, the mean log p(target completion); greedy, the share of
                                          probes greedy decoding completes with the target)

MitigationRecord ("mitigation"): the same measurement with the victim trained under a mitigation, against a
clean control trained under the same mitigation. Every AttackRecord field, and requires cell*, attack*,
budget*, mitigation*, delta_logodds*.

    mitigation     str                    the mitigation's label
    mitigation_params  dict               its parameters
    acc_unmitigated  fraction             task figure of the plain (unmitigated) clean control
    figures        dict                   the mitigation's own figures (epsilon, delta, epsilon_covers,
                                          clipped_fraction, parts, certified_radius_edit, ...)
    timings        adds control (the mitigated control's seconds), retrain_unmitigated (the plain retrain's)

DetectionRecord ("detection"): one detector's scores on the poisoned set against the ground truth.
Requires cell*, attack*, budget*, detector*.

    detector       str                    the detector's label
    params         dict                   its parameters
    knowledge      str                    what it needs: data, model, probe, reference or forensic
    seconds        seconds                its own run; context_seconds: the cell's whole scan
    n, n_poison    int                    documents scored, poisons among them
    auroc, auprc, tpr_at_1fpr, tpr_at_5fpr, recall_at_k   detection figures (recall at k = n_poison)
    roc            {"fpr": [...], "tpr": [...]}   the ROC curve, thinned
    flagged        int                    documents its flag rule flags
    flag_precision, flag_recall  fraction  of the flag rule (None when undefined); *_ci: detection figures
    per_class      dict                   per class holding poisons: n, n_poison, auroc
    details        dict                   the detector's own findings (Neural Cleanse: suspect_class, backdoored,
                                          anomaly_index, mask_l1; activation clustering: its classes; ...)
    <figure>_unedited  detection figure   the same figure on the same documents unedited, scored with the
                                          clean control (in-place bounded edits only); unedited_model: which

DefenceRecord ("defence"): what removing a detector's flags and retraining leaves.
Requires cell*, attack*, budget*, detector*, delta_p_after*, acc_after*, acc_control*.

    knowledge      str                    the detector's
    removed, removed_poisons  int         documents removed, poisons among them
    p_after        p                      p(target) after removal and retraining
    p_control_removed  p                  p(target) on the clean set with the same documents removed
    delta_p_after, delta_logodds_after    p, nats   against that control; *_before: the attack's own
    flip_after     bool                   top-1 after removal and not on that control
    acc_after, acc_control, acc_control_removed  fraction   after removal / clean control / clean control
                                          with the same documents removed
    asr_after, asr_control_removed  fraction   a backdoor's ASR after removal / on that control;
                                          delta_asr_after (their difference), delta_asr_before (the attack's own)
    seconds        seconds                the two retrains

SkipRecord ("skip"): a detector that did not run on a cell. Requires detector*, reason*.

ErrorRecord ("error"): a plugin (an attack, a pipeline's training, a detector) that raised in a cell; the other
cells go on. Requires stage*, message*. A cell whose attack raised has no attack record, so the next run tries
it again; its error is superseded once it has one.

    stage          "attack" | "detection" | "detector"   what raised: crafting or measuring the attack (or
                                          retraining it under a mitigation), the cell's detection and defence as
                                          a whole, or one detector
    detector       str                    the detector's label (stage "detector")
    error          str                    the exception's type
    message        str                    the exception's first line
    where          str                    the innermost frame it was raised in (file:line in function)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

from ..errors import DataError, UserError
from ..io import read_jsonl

log = logging.getLogger(__name__)

SCHEMA = 2
RENAMED = {1: {"scenario": "dataset"}}  # per schema version: its field names -> this schema's


def required() -> Any:
    """A field a kind requires where its base leaves it optional (a bare annotation would inherit the base's
    None default)."""
    return field()


@dataclass(frozen=True, kw_only=True)
class Record:
    """What every kind shares: where the record comes from, and the fields this schema does not name."""

    kind: ClassVar[str]
    cell: str | None = None
    dataset: str | None = None
    attack: str | None = None
    variant: str | None = None
    budget: dict | None = None
    target: dict | None = None
    seed: int | None = None
    victim: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        clash = set(self.extra) & ({f.name for f in dataclasses.fields(self)} | {"kind", "schema"})
        if clash:
            raise ValueError(f"extra fields {sorted(clash)} are named fields of a {self.kind} record")

    def shared_fields(self) -> dict:
        """The fields every kind shares, by name: a cell's detection, defence and skip records take its attack
        record's."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Record) if f.name != "extra"}

    def to_dict(self) -> dict:
        """The JSON line: kind, schema version, every field that is not None, then the extra fields."""
        named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"kind": self.kind, "schema": SCHEMA, **{k: v for k, v in named.items() if v is not None},
                **self.extra}

    @classmethod
    def from_dict(cls, data: dict, where: str = "record") -> "Record":
        """A record from its JSON line, of the kind the line names (or `cls`'s, checked), upgraded from an older
        schema; a line lacking a field its kind requires, or holding something else than a number in a required
        float, is refused in one line that says `where`."""
        kind = data.get("kind")
        record_cls = KINDS.get(kind) if cls is Record else cls
        if record_cls is None or record_cls.kind != kind:
            raise DataError(f"{where}: kind {kind!r}, expected {' or '.join(KINDS) if cls is Record else cls.kind}")
        version = data.get("schema", 1)
        if version not in (*RENAMED, SCHEMA):
            raise DataError(f"{where} ({kind}): schema {version!r}; this version of infusion-audit reads 1 to {SCHEMA}")
        data = {RENAMED.get(version, {}).get(k, k): v for k, v in data.items() if k not in ("kind", "schema")}
        named = {f.name: f for f in dataclasses.fields(record_cls) if f.name != "extra"}
        needed = [f for f in named.values() if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING]
        missing = [f.name for f in needed if data.get(f.name) is None]
        if missing:
            raise DataError(f"{where} ({kind}) lacks {', '.join(missing)}")
        not_numbers = [f.name for f in needed if f.type == "float" and not _is_number(data[f.name])]
        if not_numbers:
            raise DataError(f"{where} ({kind}): {', '.join(not_numbers)} must be a number")
        return record_cls(**{k: v for k, v in data.items() if k in named},
                          extra={k: v for k, v in data.items() if k not in named})


def _is_number(value: Any) -> bool:
    """An int or float (a non-finite one too: the summaries leave it out, as they do any figure), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class EffectRecord(Record):
    """An effect measured on a victim retrained on the poisoned set against its clean control: the fields attack
    and mitigation records share (see the module's schema)."""

    attack: str = required()
    budget: dict = required()
    delta_p: float | None = None
    delta_logodds: float
    domain: str | None = None
    params: dict | None = None
    repeat: int | None = None
    p_before: float | None = None
    p_control: float | None = None
    p_poisoned: float | None = None
    logodds_control: float | None = None
    logodds_poisoned: float | None = None
    top1_control: bool | None = None
    top1_poisoned: bool | None = None
    flip: bool | None = None
    acc_control: float | None = None
    acc_poisoned: float | None = None
    norms: dict | None = None
    poisoned_indices: list[int] | None = None
    artefact: str | None = None
    timings: dict | None = None
    predicted_delta_f: float | None = None
    asr_before: float | None = None
    asr_control: float | None = None
    asr_poisoned: float | None = None
    delta_asr: float | None = None
    triggered: int | None = None

    @classmethod
    def from_figures(cls, before: dict, control: dict, poisoned: dict, **fields: Any) -> "EffectRecord":
        """A record from a behaviour's figures (at least p, logodds and top1; a backdoor's asr and triggered too) on
        the attacker's model before the attack, on the clean control and on the poisoned retrain: the differences
        are taken here, once, and the behaviour's other figures kept as <figure>_before, <figure>_control and
        <figure>_poisoned."""
        others = sorted(set(poisoned) - {"p", "logodds", "top1", "asr", "triggered"})
        if "asr" in poisoned:
            fields.update(asr_before=before["asr"], asr_control=control["asr"], asr_poisoned=poisoned["asr"],
                          delta_asr=poisoned["asr"] - control["asr"], triggered=poisoned["triggered"])
        return cls(p_before=before["p"], p_control=control["p"], p_poisoned=poisoned["p"],
                   delta_p=poisoned["p"] - control["p"], logodds_control=control["logodds"],
                   logodds_poisoned=poisoned["logodds"], delta_logodds=poisoned["logodds"] - control["logodds"],
                   top1_control=control["top1"], top1_poisoned=poisoned["top1"],
                   flip=poisoned["top1"] and not control["top1"],
                   extra={f"{name}_{stage}": figures[name] for name in others
                          for stage, figures in (("before", before), ("control", control), ("poisoned", poisoned))},
                   **fields)


@dataclass(frozen=True, kw_only=True)
class AttackRecord(EffectRecord):
    """A poisoning's effect on one victim against its clean control."""

    kind: ClassVar[str] = "attack"
    delta_p: float = required()


@dataclass(frozen=True, kw_only=True)
class MitigationRecord(EffectRecord):
    """A poisoning's effect on a victim trained under a mitigation, against a clean control trained under it."""

    kind: ClassVar[str] = "mitigation"
    cell: str = required()
    mitigation: str
    mitigation_params: dict | None = None
    acc_unmitigated: float | None = None
    figures: dict | None = None


@dataclass(frozen=True, kw_only=True)
class DetectionRecord(Record):
    """One detector's scores on a cell's poisoned set, against the ground truth, with the unedited null."""

    kind: ClassVar[str] = "detection"
    cell: str = required()
    attack: str = required()
    budget: dict = required()
    detector: str
    params: dict | None = None
    knowledge: str | None = None
    seconds: float | None = None
    context_seconds: float | None = None
    n: int | None = None
    n_poison: int | None = None
    auroc: dict | None = None
    auprc: dict | None = None
    tpr_at_1fpr: dict | None = None
    tpr_at_5fpr: dict | None = None
    recall_at_k: dict | None = None
    roc: dict | None = None
    flagged: int | None = None
    flag_precision: float | None = None
    flag_recall: float | None = None
    flag_precision_ci: dict | None = None
    flag_recall_ci: dict | None = None
    per_class: dict | None = None
    details: dict | None = None
    auroc_unedited: dict | None = None
    auprc_unedited: dict | None = None
    tpr_at_1fpr_unedited: dict | None = None
    tpr_at_5fpr_unedited: dict | None = None
    recall_at_k_unedited: dict | None = None
    unedited_model: str | None = None


@dataclass(frozen=True, kw_only=True)
class DefenceRecord(Record):
    """What is left of a cell's attack after removing what a detector flags and retraining."""

    kind: ClassVar[str] = "defence"
    cell: str = required()
    attack: str = required()
    budget: dict = required()
    detector: str
    delta_p_after: float
    acc_after: float
    acc_control: float
    knowledge: str | None = None
    removed: int | None = None
    removed_poisons: int | None = None
    p_after: float | None = None
    p_control_removed: float | None = None
    delta_p_before: float | None = None
    delta_logodds_after: float | None = None
    delta_logodds_before: float | None = None
    flip_after: bool | None = None
    acc_control_removed: float | None = None
    seconds: float | None = None
    asr_after: float | None = None
    asr_control_removed: float | None = None
    delta_asr_after: float | None = None
    delta_asr_before: float | None = None


@dataclass(frozen=True, kw_only=True)
class SkipRecord(Record):
    """A detector that did not run on a cell, and why."""

    kind: ClassVar[str] = "skip"
    detector: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ErrorRecord(Record):
    """A plugin that raised in a cell: what raised and its message (the cell's other records stand)."""

    kind: ClassVar[str] = "error"
    stage: str
    message: str
    detector: str | None = None
    error: str | None = None
    where: str | None = None


KINDS: dict[str, type[Record]] = {cls.kind: cls for cls in (AttackRecord, DetectionRecord, DefenceRecord, SkipRecord,
                                                            MitigationRecord, ErrorRecord)}


def by_kind(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records split by kind, every kind present (empty when it has none), in file order."""
    out: dict[str, list[Record]] = {kind: [] for kind in KINDS}
    for record in records:
        out[record.kind].append(record)
    return out


def load_records(run_dir: str | Path) -> dict[str, list[Record]]:
    """The records of run_dir/results.jsonl by kind; a line of an unknown kind is skipped with a warning."""
    path = Path(run_dir) / "results.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir}: no results.jsonl here; is this a run directory written by `infusion-audit bench`?")
    records = []
    for i, line in enumerate(read_jsonl(path), start=1):
        kind = line.get("kind") if isinstance(line, dict) else None
        if not isinstance(kind, str) or kind not in KINDS:
            log.warning("%s: record %d has unknown kind %r; skipped", path, i, kind)
            continue
        records.append(Record.from_dict(line, f"{path}: record {i}"))
    return by_kind(records)
