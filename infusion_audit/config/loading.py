"""Typed YAML: dataclasses filled from mappings, every mistake one line.

`from_dict` checks each key against the field's type and its ``metadata`` bounds (``min``, ``max``,
``gt``), then the dataclass' own `validate(source, prefix)`, and fails with one line naming the file,
the key and what was expected. It checks and builds; it never fills in what a section left out beyond
the dataclass defaults (that is `sections.with_defaults`, one explicit step).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError

BUILTIN_CONFIGS = Path(__file__).parent.parent / "configs"


def bounded(default: Any, *, min: float | None = None, max: float | None = None, gt: float | None = None,
            help: str = "") -> Any:
    """A dataclass field with numeric bounds checked when a config is loaded."""
    meta = {k: v for k, v in (("min", min), ("max", max), ("gt", gt)) if v is not None}
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PluginSpec:
    """A registered plugin name (or ``package.module:callable``) and keyword parameters for it."""

    name: str
    params: dict = field(default_factory=dict)


def dotted(prefix: str, name: str) -> str:
    """A key's dotted name under `prefix` (a section's, or "" for a section loaded alone)."""
    return f"{prefix}.{name}" if prefix else name


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
        arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        if len(arms) == 1:  # an optional section or value: its own mistakes, named precisely
            return _convert(value, arms[0], source, key)
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
        raise ConfigError(source, dotted(prefix, str(unknown[0])), f"no such key (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        converted = _convert(value, hints[name], source, dotted(prefix, name))
        _check_bounds(converted, fields[name].metadata, source, dotted(prefix, name))
        kwargs[name] = converted
    missing = [f.name for f in fields.values()
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(source, dotted(prefix, missing[0]), "a value (the key is required)")
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
    """A path to a YAML file, or the name of a built-in config (``digits``, ``cifar10-paper``...). Only a file
    stands in for a built-in name: a folder called ``digits`` (a user's data) does not shadow the config."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    builtin = BUILTIN_CONFIGS / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    if path.is_dir():
        raise ConfigError(str(path), "", "a YAML file or a built-in config name (this is a folder)")
    return path


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def non_default(obj: Any, always: tuple[str, ...] = ()) -> dict:
    """The fields of dataclass `obj` that differ from their defaults, plus `always`: what a cache key hashes,
    so that a field added later with a default keeps every existing key (and its cached results) valid."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.name in always or value != default:
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


