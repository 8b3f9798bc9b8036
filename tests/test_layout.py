"""The package's layering: no module imports one that (directly or through others) imports it back,
counting imports inside functions too, so no cycle is hidden behind a lazy import."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"infusion_audit": "infusion_audit", "infusion_audit.attacks": "attacks",
            "infusion_audit.detectors": "detectors", "infusion_audit.reports": "reports",
            "infusion_audit.mitigations": "mitigations"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "infusion_audit.bench" in graph and graph["infusion_audit.bench"]  # the scan found real imports
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# The layers (ARCHITECTURE.md): a module imports only from its own layer or the ones it builds on.
FOUNDATION = ("errors", "version", "io", "runtime", "registry", "config", "data", "models", "training", "pipeline",
              "behaviour", "backdoor", "statistics", "metrics", "influence", "text", "results", "segment")
ORCHESTRATION = ("__main__", "protocol", "grid", "detection", "scan", "bench", "executors", "cli")
LAYERS = {"foundation": set(), "plugins": {"foundation"}, "presentation": {"foundation"},
          "orchestration": {"foundation", "plugins", "presentation"}}


def layer(module: str) -> str | None:
    """The layer of a module of the package, by its first name under infusion_audit; None if unassigned."""
    parts = module.split(".")
    if len(parts) == 1:
        return "orchestration"  # the package's __init__: the public API
    if parts[1] in ("attacks", "detectors", "mitigations"):
        return "plugins"
    if parts[1] == "reports":
        return "presentation"
    return "foundation" if parts[1] in FOUNDATION else "orchestration" if parts[1] in ORCHESTRATION else None


def test_every_module_has_a_layer():
    unassigned = sorted(m for m in _modules() if layer(m) is None)
    assert not unassigned, f"modules with no layer (add them to FOUNDATION or ORCHESTRATION): {unassigned}"


def test_modules_import_only_their_own_layer_and_those_below():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        mine = layer(name)
        for imported in sorted(_imports(name, path, modules)):
            theirs = layer(imported)
            if theirs != mine and theirs not in LAYERS[mine]:
                wrong.append(f"{name} ({mine}) imports {imported} ({theirs})")
    assert not wrong, "layering: " + "; ".join(wrong)
    # the check sees real imports: the bench (orchestration) reaches every layer
    bench_imports = {layer(m) for m in _imports("infusion_audit.grid", modules["infusion_audit.grid"], modules)}
    assert {"foundation", "plugins", "orchestration"} <= bench_imports
