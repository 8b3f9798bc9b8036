"""Name -> plugin registries for attacks, detectors, mitigations, datasets and models.

Built-ins register with a decorator; third-party distributions add plugins through entry points
(groups ``infusion_audit.attacks``, ``.detectors``, ``.mitigations``, ``.datasets``, ``.models``), like pytest's
plugins. A plugin that fails to import, or reuses a taken name, is reported by name and skipped;
it never breaks the others.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Callable

from .errors import PluginError

log = logging.getLogger(__name__)

BUILTIN_MODULES = (
    "infusion_audit.data",
    "infusion_audit.models",
    "infusion_audit.pipeline",
    "infusion_audit.attacks",
    "infusion_audit.detectors",
    "infusion_audit.mitigations",
    "infusion_audit.text",
)


@dataclass(frozen=True)
class Plugin:
    name: str
    obj: Any
    description: str
    source: str  # "built-in" or "<distribution> (entry point)"


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


class Registry:
    """One kind of plugin. `get` and `plugins` load built-ins and entry points on first use."""

    def __init__(self, kind: str):
        self.kind = kind
        self.group = f"infusion_audit.{kind}"
        self._plugins: dict[str, Plugin] = {}
        self.problems: list[str] = []
        self._discovered = False

    def register(self, name: str, description: str | None = None) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            self._add(Plugin(name, obj, description or _first_line(obj), "built-in"))
            return obj

        return decorator

    def _add(self, plugin: Plugin) -> None:
        taken = self._plugins.get(plugin.name)
        if taken is not None and taken.obj is not plugin.obj:
            problem = (
                f"{self.kind[:-1]} plugin {plugin.name!r} from {plugin.source} ignored: "
                f"the name is taken by {taken.source}"
            )
            self.problems.append(problem)
            log.warning(problem)
            return
        self._plugins[plugin.name] = plugin

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            source = f"{dist} (entry point {ep.value})"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the others
                problem = f"{self.kind[:-1]} plugin {ep.name!r} from {source} failed to import: {exc}"
                self.problems.append(problem)
                log.warning(problem)
                continue
            self._add(Plugin(ep.name, obj, _first_line(obj), source))

    def plugins(self) -> list[Plugin]:
        self.discover()
        return sorted(self._plugins.values(), key=lambda p: p.name)

    def names(self) -> list[str]:
        return [p.name for p in self.plugins()]

    def get(self, name: str) -> Any:
        """The plugin called `name`, or a user's own callable given as ``package.module:callable``."""
        if ":" in name:
            return load_callable(name)
        self.discover()
        if name not in self._plugins:
            raise PluginError(f"unknown {self.kind[:-1]} {name!r}; available: {', '.join(self.names())}")
        return self._plugins[name].obj


def load_callable(spec: str) -> Any:
    """Import ``package.module:attr`` (a user's own model factory or dataset) with a one-line error."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{spec!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(f"{spec!r}: cannot import module {module_name!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{spec!r}: {attr!r} is not callable")
    return obj


ATTACKS = Registry("attacks")
DETECTORS = Registry("detectors")
MITIGATIONS = Registry("mitigations")
DATASETS = Registry("datasets")
MODELS = Registry("models")
PIPELINES = Registry("pipelines")
REGISTRIES = {r.kind: r for r in (ATTACKS, DETECTORS, MITIGATIONS, DATASETS, MODELS, PIPELINES)}
