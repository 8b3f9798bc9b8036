"""Every section of a config file, declared once.

One YAML file describes a whole audit (`AuditConfig`); each command reads the sections it uses (train:
pipeline; attack: + influence, attack, budgets, victims, mitigations; scan: pipeline, influence, scan;
bench: all). Loading checks (`loading.from_dict` and each section's `validate`); `with_defaults` is the
one step that fills in what a file leaves to the kind of data (the pipeline, the default arms).
Files written with the keys of schema 1 keep loading: `upgrade` renames them, with a warning each.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import yaml

from ..errors import ConfigError, UserError
from ..registry import ATTACKS, DATASETS, DETECTORS, MITIGATIONS, MODELS, PIPELINES
from .loading import PluginSpec, bounded, dotted, from_dict, load_yaml, non_default, resolve_config_path, to_dict

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pipeline
@dataclass
class TrainConfig:
    """The training recipe. `order: fixed` replays one seeded permutation every epoch (the paper)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.0, min=0, max=1)
    weight_decay: float = bounded(0.0, min=0)
    adam_betas: list[float] = bounded([0.9, 0.999], help="Adam's decay rates of its moment estimates")
    schedule: PluginSpec | None = field(default=None, metadata={
        "help": "a torch.optim.lr_scheduler class stepped once per epoch, e.g. {name: CosineAnnealingLR, "
                "params: {T_max: 10}} or {name: MultiStepLR, params: {milestones: [5], gamma: 0.1}}"})
    augment: list[PluginSpec] = field(default_factory=list, metadata={
        "help": "torchvision.transforms.v2 classes applied in order to each training image, seeded per "
                "(epoch, document), e.g. [{name: RandomAffine, params: {degrees: 10}}]"})
    clip_grad_norm: float | None = field(default=None, metadata={"help": "clip the batch gradient's norm to this"})
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = bounded(16, min=1)
    epochs: int = bounded(10, min=1)
    seed: int = 0
    order: Literal["fixed", "reshuffle"] = "fixed"
    device: Literal["auto", "cpu", "cuda"] = field(default="cpu", metadata={
        "help": "where models train and attacks, influence and detectors compute (auto: cuda where present); "
                "the command line's --device overrides it"})

    def validate(self, source: str, prefix: str) -> None:
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(source, dotted(prefix, "adam_betas"), "two numbers in [0, 1)", self.adam_betas)
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(source, dotted(prefix, "clip_grad_norm"), "a value > 0 (or null)", self.clip_grad_norm)
        if self.schedule is not None:
            import torch.optim.lr_scheduler as schedulers

            if not isinstance(getattr(schedulers, self.schedule.name, None), type):
                raise ConfigError(source, dotted(prefix, "schedule.name"), "a torch.optim.lr_scheduler class",
                                  self.schedule.name)
        for i, spec in enumerate(self.augment):
            from torchvision.transforms import v2

            if not isinstance(getattr(v2, spec.name, None), type):
                raise ConfigError(source, dotted(prefix, f"augment[{i}].name"), "a torchvision.transforms.v2 class",
                                  spec.name)


@dataclass
class PipelineConfig:
    """The training set-up under audit: a dataset split, a model factory and a training recipe; `factory`
    names a user's own Pipeline (a subclass or ``package.module:callable`` taking this config) that overrides
    any of them, its training loop included."""

    factory: PluginSpec | None = None
    dataset: PluginSpec = field(default_factory=lambda: PluginSpec("digits"))
    model: PluginSpec = field(default_factory=lambda: PluginSpec("digits-cnn"))
    train: TrainConfig = field(default_factory=TrainConfig)
    quality_floor: float = bounded(0.0, min=0, max=1, help="attacks refuse a trained model whose task quality "
                                   "(test accuracy; decryption accuracy on Caesar) is below this")

    def identity(self) -> dict:
        """What a trained model depends on: everything but the quality floor, which only gates attacks. Hashed
        under schema 1's key names, so checkpoints and bench cells written before the rename keep their keys."""
        out = to_dict(self)
        return {"pipeline": out.pop("factory"), **{k: v for k, v in out.items() if k != "quality_floor"}}

    def kind(self) -> str:
        """The kind of data ("image", "text") the pipeline trains on, known before anything is built."""
        if self.factory is not None:
            kind = getattr(PIPELINES.get(self.factory.name), "kind", None)
            if isinstance(kind, str):
                return kind
        return getattr(DATASETS.get(self.dataset.name), "kind", "image")

    def on_device(self, device: str | None = None) -> "PipelineConfig":
        """A copy with `train.device` set to `device` (default: its own) as this process resolves it (auto -> cpu
        or cuda), so that what a pipeline's fingerprint records is the device its numbers come from."""
        from ..runtime import resolve_device

        resolved = resolve_device(device or self.train.device).type
        return dataclasses.replace(self, train=dataclasses.replace(self.train, device=resolved))

    def check_quality(self, figure: str, value: float) -> None:
        """Refuse to attack a model that has not learned its task: an audit of it would measure nothing."""
        if not value >= self.quality_floor:
            raise UserError(f"the trained model's {figure} is {value:.4g}, below the pipeline's quality floor "
                            f"{self.quality_floor:g}; fix the training recipe (or lower pipeline.quality_floor)")


# --------------------------------------------------------------------------- influence
@dataclass
class InfluenceConfig:
    """How influence is computed, for the attacker and the detectors alike. `ekfac` (kronfluence's factors)
    and `exact` (conjugate gradient) solve in the full parameter space; `projected` projects every
    Linear/Conv2d layer's gradient to rank x rank (LoGra) for self-influence and probes at scale, and serves
    detectors only."""

    backend: Literal["ekfac", "exact", "projected"] = "ekfac"
    damping: float | Literal["auto"] = field(default=1e-3, metadata={
        "help": "λ added to the curvature; auto (projected only): 0.1 x its mean eigenvalue"})
    fit_size: int | None = field(default=None, metadata={
        "help": "ekfac/exact: fit the curvature on a seeded sample of this many documents (default: all)"})
    rank: int | None = field(default=None, metadata={
        "help": "projected: each layer's gradient is projected to rank x rank (default 16)"})
    seed: int = bounded(0, min=0, help="ekfac: the Fisher's sampled labels; projected: the projections")

    def validate(self, source: str, prefix: str) -> None:
        if self.damping == "auto" and self.backend != "projected":
            raise ConfigError(source, dotted(prefix, "damping"), "a number > 0 (auto is for backend projected)", "auto")
        if self.damping != "auto" and not self.damping > 0:
            raise ConfigError(source, dotted(prefix, "damping"), "a number > 0", self.damping)
        if self.fit_size is not None and (self.backend == "projected" or self.fit_size < 2):
            raise ConfigError(source, dotted(prefix, "fit_size"), "a count >= 2, with backend ekfac or exact",
                              self.fit_size)
        if self.rank is not None and (self.backend != "projected" or self.rank < 1):
            raise ConfigError(source, dotted(prefix, "rank"), "a count >= 1, with backend projected", self.rank)

    def identity(self) -> dict:
        """What influence results depend on, as a cache key: backend, damping and any setting changed."""
        return non_default(self, always=("backend", "damping"))


# --------------------------------------------------------------------------- attack
@dataclass(frozen=True)
class TriggerConfig:
    """A backdoor's trigger: stamped on an image x as x' = (1 - opacity * m) * x + opacity * m * p, then put on the
    storage grid, where m is its mask and p its pattern. `patch`: a size x size square in a corner (`margin` pixels
    from its edges) holding `pattern` (checkerboard, white, dots: the four pixels of ART's add_pattern_bd in a 3 x 3
    square, or seeded noise); `blend`: the whole image blended with `pattern` (noise by default); `learned`: a
    patch whose pattern is optimised on the attacker's model to push inputs of the other classes to the target
    class. Unset `pattern` and `opacity` take the kind's defaults (patch: white, 1; blend: noise, 0.2)."""

    kind: Literal["patch", "blend", "learned"] = "patch"
    size: int = bounded(3, min=1, help="patch, learned: the square's side in pixels")
    pattern: Literal["checkerboard", "white", "dots", "noise"] | None = None
    opacity: float | None = field(default=None, metadata={"help": "the pattern's weight in (0, 1]", "gt": 0, "max": 1})
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    margin: int = bounded(0, min=0, help="patch, learned: pixels between the square and the image's edges")
    seed: int = bounded(0, min=0, help="the noise pattern's seed")

    def validate(self, source: str, prefix: str) -> None:
        if self.kind == "learned" and self.pattern is not None:
            raise ConfigError(source, dotted(prefix, "pattern"), "no pattern for a learned trigger (it is optimised)",
                              self.pattern)
        if self.resolved().pattern == "dots" and (self.kind != "patch" or self.size != 3):
            raise ConfigError(source, dotted(prefix, "pattern"), "dots only on a 3 x 3 patch", self.pattern)

    def resolved(self) -> "TriggerConfig":
        """The same trigger with the kind's defaults filled in: one spelling per trigger (cell keys hash it)."""
        pattern = self.pattern or {"patch": "white", "blend": "noise"}.get(self.kind)
        opacity = self.opacity if self.opacity is not None else 0.2 if self.kind == "blend" else 1.0
        return dataclasses.replace(self, pattern=pattern, opacity=opacity)

    def label(self) -> str:
        """'3×3 checkerboard patch', 'noise blend α=0.2', '3×3 learned patch top-left, 1 px in': what tells two
        triggers apart (a noise pattern's seed aside)."""
        t = self.resolved()
        if t.kind == "blend":
            return f"{t.pattern} blend α={t.opacity:g}"
        alpha = f" α={t.opacity:g}" if t.opacity != 1 else ""
        where = (f" {t.position}" if t.position != "bottom-right" else "") + (f", {t.margin} px in" if t.margin else "")
        what = "learned" if t.kind == "learned" else t.pattern
        return f"{t.size}×{t.size} {what} patch{alpha}{where}"


@dataclass
class AttackSpec:
    """One attack arm: a registered attack, its own params (over the shared budget), a table label, how many
    times each cell runs it with its own attack seed (`repeats`, paired with other arms by their mean), and, for
    backdoor targets, its trigger (default: the attack's own)."""

    name: str
    params: dict = field(default_factory=dict)
    variant: str | None = None
    repeats: int = bounded(1, min=1)
    trigger: TriggerConfig | None = None


@dataclass
class TargetsConfig:
    """The behaviours attacked, as the pipeline defines them. Images: `n` seeded test images, `rule`
    random-other (one class != label each) or all-classes; or, with rule backdoor, `n` seeded target classes of a
    backdoor (each arm stamps its trigger; attack success rate on the triggered test images of the other
    classes). Text: `pairs` ([shift, target_shift] on Caesar,
    every ordered pair when empty; [word_a, word_b] on any other corpus), each measured on `probes` prompts. A word
    pair's `measure`: `prefix`, distinct test prefixes that end right before A; or `document`, the paper's: every
    occurrence of A in the first `probes` test documents that hold A at least 5 times."""

    n: int = bounded(30, min=1)
    rule: Literal["random-other", "all-classes", "backdoor"] = "random-other"
    seed: int = 0
    pairs: list[list[int | str]] = bounded([], help="text: [shift, target_shift] or [word_a, word_b] pairs")
    probes: int = bounded(32, min=1, help="text: test prompts (measure document: test documents) each behaviour "
                                          "is measured on")
    measure: Literal["prefix", "document"] = "prefix"


@dataclass
class BudgetConfig:
    """Shared by every attack that takes the key: k documents (count, or fraction of the train set)."""

    k: int | float = 0.01
    eps: float = bounded(1 / 16, gt=0)
    norm: Literal["linf", "l2"] = "linf"
    quantize: bool = True
    tokens: int | float = field(default=2, metadata={
        "help": "text: tokens changed per document at most, a count or a share of its tokens (0.08: the paper's)"})

    def validate(self, source: str, prefix: str) -> None:
        if isinstance(self.k, int) and self.k < 1 or isinstance(self.k, float) and not 0 < self.k <= 1:
            raise ConfigError(source, dotted(prefix, "k"), "a count >= 1 or a fraction in (0, 1]", self.k)
        if isinstance(self.tokens, int) and self.tokens < 1 or isinstance(self.tokens, float) and not 0 < self.tokens < 1:
            raise ConfigError(source, dotted(prefix, "tokens"), "a count >= 1 or a share in (0, 1)", self.tokens)


@dataclass
class ProtocolConfig:
    """Perturb against the checkpoint after `attack_epoch` (default: the last), then either continue
    from `start_epoch` (default attack_epoch - 1) for `epochs` epochs, or retrain from scratch. `segment` (the
    paper's): perturb the final model and replay only the last `steps` optimizer steps of training (default:
    the whole last epoch) from the state at their start, Adam's moments included (`infusion_audit.segment`)."""

    kind: Literal["continue", "scratch", "segment"] = "continue"
    attack_epoch: int | None = None
    start_epoch: int | None = None
    epochs: int = bounded(1, min=1)
    steps: int | None = field(default=None, metadata={
        "min": 1, "help": "segment: the optimizer steps replayed, the last of training (default: the last epoch's)"})

    def validate(self, source: str, prefix: str) -> None:
        if self.steps is not None and self.kind != "segment":
            raise ConfigError(source, dotted(prefix, "steps"), "no steps unless kind is segment", self.steps)
        if self.kind == "segment" and (self.attack_epoch, self.start_epoch, self.epochs) != (None, None, 1):
            raise ConfigError(source, prefix, "kind segment without attack_epoch, start_epoch or epochs (it "
                              "perturbs the final model and replays the end of its last epoch)")

    def identity(self) -> dict:
        """What a retrain depends on, as a cache key: `steps` only when set, so existing cell keys stay valid."""
        return non_default(self, always=("kind", "attack_epoch", "start_epoch", "epochs"))


DEFAULT_ATTACKS = {  # the arms an attack section without `attacks` runs, by the kind of data
    "image": [AttackSpec("infusion"), AttackSpec("random-noise"), AttackSpec("probe-insertion", {"copies": 1}),
              AttackSpec("probe-insertion"), AttackSpec("label-flip")],
    "text": [AttackSpec("infusion-text"), AttackSpec("random-tokens"), AttackSpec("probe-insertion-text")],
}


@dataclass
class AttackConfig:
    attacks: list[AttackSpec] = field(default_factory=list, metadata={
        "help": "the arms (default: Infusion and the baselines for the pipeline's kind of data)"})
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    seeds: list[int] = bounded([0], help="attack seeds (random selection and noise); one cell per seed")
    write_artefacts: bool = True
    format: Literal["npz", "png"] = "npz"

    def validate(self, source: str, prefix: str) -> None:
        for i, spec in enumerate(self.attacks):
            _check_plugin(ATTACKS, spec.name, source, dotted(prefix, f"attacks[{i}].name"), "attack")


# --------------------------------------------------------------------------- scan and defence
@dataclass
class ScanConfig:
    """How a dataset is scanned: which detectors, what the defender assumes, how figures are measured."""

    detectors: list[PluginSpec] = field(default_factory=list, metadata={
        "help": "the detectors (default: every registered one that scores the data's kind)"})
    expected_fraction: float = bounded(0.01, gt=0, max=0.49, help="expected poison fraction ε")
    bootstrap: int = bounded(1000, min=0, help="bootstrap resamples for the CIs (0: none)")
    features_layer: str | None = field(default=None, metadata={
        "help": "module whose output the feature detectors read, e.g. layer4 (default: the input of the last "
                "nn.Linear, or the model's features()/head)"})
    attacks: list[str] = field(default_factory=list, metadata={
        "help": "bench: the attacks whose poisoned sets are scanned and defended against (default: every one)"})

    def validate(self, source: str, prefix: str) -> None:
        for i, spec in enumerate(self.detectors):
            _check_plugin(DETECTORS, spec.name, source, dotted(prefix, f"detectors[{i}].name"), "detector")


@dataclass
class DefenceConfig:
    """Remove what each detector flags and retrain by the attack protocol on what is left."""

    enabled: bool = True
    detectors: list[str] = field(default_factory=list, metadata={
        "help": "the detectors (their labels) whose flags are removed (default: every detector scanned)"})


# --------------------------------------------------------------------------- the gate
@dataclass
class PolicyConfig:
    """What the team will not accept from a bench (its gate in CI): `bench` exits with a code of its own when a
    rule fails and says which in one line. Every rule judges each attack at its largest budget; random-edit
    controls are measurements, not attacks, and are not judged. A cell whose plugin raised fails the policy
    unless `allow_errors`."""

    undetected_at: Literal["data", "model", "probe", "reference", "forensic"] | None = field(default=None, metadata={
        "help": "fail when an attack succeeds and no detector available to a defender with this much catches it "
                "(data: the data alone; model: + a model trained on it; probe: + held-out probe inputs; reference: "
                "+ a trusted reference copy; forensic: + the suspicious behaviour, no reference copy)"})
    max_mitigated_effect: float | None = field(default=None, metadata={
        "help": "fail when an attack's mean Δ log-odds under a mitigation is above this (nats); a run without a "
                "mitigation fails it"})
    max_mitigated_asr: float | None = field(default=None, metadata={
        "help": "fail when a backdoor's mean ΔASR under a mitigation is above this (a fraction of the triggered "
                "images); a run without a backdoor under a mitigation fails it", "min": 0, "max": 1})
    attacks: list[str] = field(default_factory=list, metadata={
        "help": "the attacks the rules judge, by name (default: every attack of the run)"})
    allow_errors: bool = field(default=False, metadata={
        "help": "a cell whose attack or detector raised does not fail the policy (it is reported all the same)"})

    def validate(self, source: str, prefix: str) -> None:
        for i, name in enumerate(self.attacks):
            _check_plugin(ATTACKS, name, source, dotted(prefix, f"attacks[{i}]"), "attack")

    def rules(self) -> dict:
        """The rules set, by key (what a verdict reports the policy as)."""
        return {k: v for k, v in to_dict(self).items() if v not in (None, [], False)}


# --------------------------------------------------------------------------- the whole audit
@dataclass
class AuditConfig:
    """A whole audit: the pipeline, how influence is computed, the attack grid and its budgets, the victims,
    the detectors (`scan`), the defence, the mitigations and the policy a bench is judged by."""

    pipeline: PipelineConfig | None = field(default=None, metadata={
        "help": "the training set-up under audit (default: the digits pipeline; scan: one for the data's shape)"})
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    budgets: list[BudgetConfig] = field(default_factory=list, metadata={
        "help": "the budgets of the grid (default: attack.budget alone)"})
    victims: list[PluginSpec] = field(default_factory=list, metadata={
        "help": "more victims trained on the poisoned set (transfer): a model (trained by the built-in recipe) or "
                "a pipeline (a registered one or a Pipeline subclass as package.module:Class)"})
    scan: ScanConfig = field(default_factory=ScanConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    mitigations: list[PluginSpec] = field(default_factory=list, metadata={
        "help": "ways of training the victim (clip, dp-sgd, partition): each cell is retrained and measured "
                "under each, against a clean control trained under the same mitigation"})
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={
        "help": "bench: what the team will not accept; the command exits with 3 when a rule fails"})

    def grid_budgets(self) -> list[BudgetConfig]:
        return self.budgets or [self.attack.budget]

    def validate(self, source: str, prefix: str) -> None:
        kind = (self.pipeline or PipelineConfig()).kind()
        if self.attack.targets.rule == "backdoor" and kind != "image":
            raise ConfigError(source, "attack.targets.rule", f"a rule for {kind} behaviours (backdoor is for images)",
                              "backdoor")
        behaviour = "backdoor" if self.attack.targets.rule == "backdoor" else "targeted"
        for i, spec in enumerate(self.attack.attacks):
            if spec.trigger is not None and behaviour != "backdoor":
                raise ConfigError(source, f"attack.attacks[{i}].trigger", "no trigger unless attack.targets.rule is "
                                  "backdoor (a trigger belongs to a backdoor target)")
            if behaviour not in ATTACKS.get(spec.name).behaviour_kinds:
                raise ConfigError(source, f"attack.attacks[{i}]", f"an attack that induces {behaviour} behaviours "
                                  "(attack.targets.rule backdoor: backdoor; any other rule: targeted)", spec.name)
        for i, spec in enumerate(self.attack.attacks):
            kinds = ATTACKS.get(spec.name).data_kinds
            if kind not in kinds:
                raise ConfigError(source, f"attack.attacks[{i}]", f"an attack that edits {kind} data "
                                  f"({spec.name} edits {', '.join(sorted(kinds))})", spec.name)
        for i, spec in enumerate(self.mitigations):
            _check_plugin(MITIGATIONS, spec.name, source, f"mitigations[{i}].name", "mitigation")
        if self.mitigations and self.attack.protocol.kind == "segment":
            raise ConfigError(source, "attack.protocol.kind", "continue or scratch with mitigations (a mitigation "
                              "retrains by its own loop; segment replays the recipe's steps)", "segment")
        for i, spec in enumerate(self.victims):
            if ":" not in spec.name and spec.name not in MODELS.names() + PIPELINES.names():
                raise ConfigError(source, f"victims[{i}].name", "a known model or pipeline "
                                  f"({', '.join(MODELS.names() + PIPELINES.names())})", spec.name)


SECTIONS = tuple(f.name for f in dataclasses.fields(AuditConfig))


def _check_plugin(registry, name: str, source: str, key: str, what: str) -> None:
    if ":" not in name and name not in registry.names():
        raise ConfigError(source, key, f"a known {what} ({', '.join(registry.names())})", name)


def with_defaults(config: AuditConfig, pipeline: PipelineConfig | None = None) -> AuditConfig:
    """The one step that fills in what a config leaves to its data: the pipeline (`pipeline`, else the digits
    pipeline) and, when no arms are listed, the default arms for the pipeline's kind of data."""
    pipeline = config.pipeline or pipeline or PipelineConfig()
    attacks = config.attack.attacks or copy.deepcopy(DEFAULT_ATTACKS[pipeline.kind()])
    return dataclasses.replace(config, pipeline=pipeline, attack=dataclasses.replace(config.attack, attacks=attacks))


# --------------------------------------------------------------------------- reading files
def upgrade(data: dict, source: str) -> dict:
    """Schema-1 keys renamed to today's, with a one-line warning each: `scenario` -> `pipeline`,
    `scenario.pipeline` -> `pipeline.factory`, `attack.influence` / `scan.influence` -> `influence`."""
    data = dict(data)
    if "scenario" in data:
        if "pipeline" in data:
            raise ConfigError(source, "scenario", "either scenario (the old name) or pipeline, not both")
        log.warning("%s: the section 'scenario' is now called 'pipeline'; read as such", source)
        data["pipeline"] = data.pop("scenario")
    pipeline = data.get("pipeline")
    if isinstance(pipeline, dict) and "pipeline" in pipeline:
        log.warning("%s: pipeline.pipeline (a user's own Pipeline) is now pipeline.factory; read as such", source)
        pipeline = dict(pipeline)
        pipeline["factory"] = pipeline.pop("pipeline")
        data["pipeline"] = pipeline
    for section in ("attack", "scan"):
        block = data.get(section)
        if isinstance(block, dict) and "influence" in block:
            block = dict(block)
            old = block.pop("influence")
            data[section] = block
            if "influence" in data and data["influence"] != old:
                raise ConfigError(source, f"{section}.influence", "the same settings as the influence section "
                                  "(one influence section now serves attacks and detectors)", old)
            log.warning("%s: %s.influence is now the top-level section 'influence'; read as such", source, section)
            data["influence"] = old
    return data


def from_sections(data: Any, source: str = "<dict>") -> AuditConfig:
    """An AuditConfig from a mapping of top-level sections (a file's, or a config given in Python), checked."""
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "a mapping of sections", data)
    data = upgrade(data, source)
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(source, str(unknown[0]), f"a known section ({', '.join(SECTIONS)})")
    return from_dict(AuditConfig, data, source)


def load_config(config: Any = None, default: str = "bench-digits", overrides: Sequence[str] = ()) -> AuditConfig:
    """An AuditConfig from a YAML path, a built-in name (`default` when None), a mapping of sections, or an
    AuditConfig; with `overrides` (``KEY=VALUE``, a dotted key of today's sections and a YAML value, e.g.
    ``pipeline.train.seed=1``) applied; checked, not yet filled in (see `with_defaults`)."""
    if isinstance(config, AuditConfig):
        if not overrides:
            return config
        config = to_dict(config)
    if isinstance(config, dict):
        data, source = config, "<dict>"
    elif config is None or isinstance(config, str) or hasattr(config, "__fspath__"):
        data, source = load_yaml(resolve_config_path(config or default))
    else:
        raise ConfigError("<config>", "", "a mapping of sections, a YAML path, a built-in name or an AuditConfig",
                          type(config).__name__)
    data = upgrade(data, source)
    for item in overrides:
        data = _override(data, item)
    return from_sections(data, source)


def _override(data: dict, item: str) -> dict:
    """`data` with one ``KEY=VALUE`` override applied (the value read as YAML); a copy, the nested mappings too."""
    name, sep, text = item.partition("=")
    path = name.strip().split(".")
    if not sep or not all(path):
        raise ConfigError("--set", item, "KEY=VALUE with a dotted key, e.g. pipeline.train.seed=1")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError("--set", item, "a value written in YAML") from None
    out = copy.deepcopy(data)
    node = out
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError("--set", item, f"{'.'.join(path[:i + 1])} to be a mapping", child)
        node = child
    node[path[-1]] = value
    return out
