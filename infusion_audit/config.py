"""Typed configs loaded from YAML.

Every section is a dataclass; `from_dict` checks each key against the field's type and its
``metadata`` bounds (``min``, ``max``, ``gt``) and fails with one line naming the file, the key and
what was expected. Sections other modules own (attack, detectors, bench) are declared here too so
one YAML file describes a whole audit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, UserError

BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def bounded(default: Any, *, min: float | None = None, max: float | None = None, gt: float | None = None,
            help: str = "") -> Any:
    """A dataclass field with numeric bounds checked when a config is loaded."""
    meta = {k: v for k, v in (("min", min), ("max", max), ("gt", gt)) if v is not None}
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- scenario
@dataclass
class PluginSpec:
    """A registered plugin name (or ``package.module:callable``) and keyword parameters for it."""

    name: str
    params: dict = field(default_factory=dict)


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
            raise ConfigError(source, f"{prefix}.adam_betas", "two numbers in [0, 1)", self.adam_betas)
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(source, f"{prefix}.clip_grad_norm", "a value > 0 (or null)", self.clip_grad_norm)
        if self.schedule is not None:
            import torch.optim.lr_scheduler as schedulers

            if not isinstance(getattr(schedulers, self.schedule.name, None), type):
                raise ConfigError(source, f"{prefix}.schedule.name", "a torch.optim.lr_scheduler class",
                                  self.schedule.name)
        for i, spec in enumerate(self.augment):
            from torchvision.transforms import v2

            if not isinstance(getattr(v2, spec.name, None), type):
                raise ConfigError(source, f"{prefix}.augment[{i}].name", "a torchvision.transforms.v2 class",
                                  spec.name)


@dataclass
class ScenarioConfig:
    """A dataset split, a model factory and a training recipe; `pipeline` names a user's own Pipeline
    (``package.module:callable`` taking this config) that overrides any of them, its training loop included."""

    pipeline: PluginSpec | None = None
    dataset: PluginSpec = field(default_factory=lambda: PluginSpec("digits"))
    model: PluginSpec = field(default_factory=lambda: PluginSpec("digits-cnn"))
    train: TrainConfig = field(default_factory=TrainConfig)
    quality_floor: float = bounded(0.0, min=0, max=1, help="attacks refuse a trained model whose task quality "
                                   "(test accuracy; decryption accuracy on Caesar) is below this")

    def identity(self) -> dict:
        """What a trained model depends on: everything but the quality floor, which only gates attacks."""
        return {k: v for k, v in to_dict(self).items() if k != "quality_floor"}

    def on_device(self, device: str | None = None) -> "ScenarioConfig":
        """A copy with `train.device` set to `device` (default: its own) as resolved in this process (auto -> cpu
        or cuda), so that what a pipeline's fingerprint records is the device its numbers come from."""
        from .runtime import resolve_device

        resolved = resolve_device(device or self.train.device).type
        return dataclasses.replace(self, train=dataclasses.replace(self.train, device=resolved))

    def check_quality(self, figure: str, value: float) -> None:
        """Refuse to attack a model that has not learned its task: an audit of it would measure nothing."""
        if not value >= self.quality_floor:
            raise UserError(f"the trained model's {figure} is {value:.3f}, below the scenario's quality floor "
                            f"{self.quality_floor:g}; fix the training recipe (or lower scenario.quality_floor)")


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(source, key, _type_name(tp), value)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _convert(value, arm, source, key)
            except ConfigError:
                continue
        raise ConfigError(source, key, _type_name(tp), value)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(source, key, _type_name(tp), value)
        return [_convert(v, inner, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, "a mapping", value)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-8 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    raise ConfigError(source, key, _type_name(tp), value)


def _check_bounds(value: Any, meta: typing.Mapping, source: str, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(source, key, f"a value > {meta['gt']}", value)
    if "min" in meta and value < meta["min"]:
        raise ConfigError(source, key, f"a value >= {meta['min']}", value)
    if "max" in meta and value > meta["max"]:
        raise ConfigError(source, key, f"a value <= {meta['max']}", value)


def from_dict(cls: type, data: Any, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and bounds."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix or "(top level)", f"a mapping ({cls.__name__})", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(source, key, f"no such key (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], source, key)
        _check_bounds(converted, fields[name].metadata, source, key)
        kwargs[name] = converted
    missing = [f.name for f in fields.values()
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(source, key, "a value (the key is required)")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(source, prefix)
    return obj


def load_yaml(path: str | Path) -> tuple[dict, str]:
    """Read a YAML mapping; a missing file or a syntax error is one line naming the file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, "", "an existing YAML file (no such file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(source, "", f"valid YAML (syntax error{where})") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "a mapping of sections", data)
    return data, source


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a built-in config (``digits``, ``cifar10-paper``...)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    builtin = BUILTIN_CONFIGS / f"{name_or_path}.yaml"
    return builtin if builtin.exists() else path


# The top-level sections of a config file. One file can describe a whole audit: each command reads
# the sections it uses (train: scenario; attack: + attack; scan: + scan; bench: all of them) and
# leaves the others to the commands that use them. Any other top-level key is a mistake.
SECTIONS = ("scenario", "attack", "budgets", "victims", "scan", "defence", "mitigations")


def load_config(cls: type, name_or_path: str | Path) -> Any:
    """Load the sections `cls` declares from a YAML file (a path or a built-in name)."""
    data, source = load_yaml(resolve_config_path(name_or_path))
    return from_sections(cls, data, source)


def from_sections(cls: type, data: Any, source: str = "<dict>") -> Any:
    """Build `cls` from a mapping of top-level sections (a config given in Python), checked as a file is."""
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "a mapping of sections", data)
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(source, str(unknown[0]), f"a known section ({', '.join(SECTIONS)})")
    own = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: v for k, v in data.items() if k in own}, source)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


@dataclass
class TrainRunConfig:
    """`infusion-audit train`: just a scenario."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
