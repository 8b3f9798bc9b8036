"""`infusion-audit plugins`: every registered plugin by kind, with where it came from."""

from __future__ import annotations

import argparse

from ..registry import REGISTRIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=list(REGISTRIES), help="list only one kind")


def run(args: argparse.Namespace) -> int:
    for kind, registry in REGISTRIES.items():
        if args.kind and kind != args.kind:
            continue
        plugins = registry.plugins()
        print(f"{kind} ({len(plugins)}):")
        width = max((len(p.name) for p in plugins), default=0)
        for p in plugins:
            print(f"  {p.name:<{width}}  {p.description}  [{p.source}]")
        for problem in registry.problems:
            print(f"  ! {problem}")
    return 0
