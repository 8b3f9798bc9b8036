"""The `infusion-audit` command line. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; user errors print one line and exit with 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .version import __version__
from .errors import UserError
from .runtime import DEFAULT_THREADS, DEVICES, configure

log = logging.getLogger("infusion_audit")

# name -> (module, one-line help)
COMMANDS = {
    "bench": ("infusion_audit.bench", "attack-then-defend benchmark and its HTML report (default: quick digits benchmark)"),
    "attack": ("infusion_audit.evaluation",
               "craft poisoned training sets (Infusion and baselines) and measure them against a clean control"),
    "scan": ("infusion_audit.scan", "score every document of a suspect dataset by several detectors; ranked CSV + summary"),
    "report": ("infusion_audit.reports.render", "re-render the HTML report of a run directory"),
    "train": ("infusion_audit.cli", "train a scenario; writes a checkpoint per epoch and metrics.json"),
    "plugins": ("infusion_audit.cli", "list attacks, detectors, mitigations, datasets and models, and where each "
                "came from"),
}

EPILOG = """\
examples:
  infusion-audit bench                        quick attack-then-defend benchmark on sklearn digits
  infusion-audit bench bench-caesar --out runs/caesar   the same on the Caesar-cipher language task
  infusion-audit attack digits --out runs/a   craft Infusion poisons on digits and measure them
  infusion-audit scan suspect.npz --reference clean.npz --out runs/s
  infusion-audit plugins
  infusion-audit bench bench-wordpref         word preference on a tiny GPT-Neo (stories)
  infusion-audit bench bench-digits-hardening clip, DP-SGD and partition training against three attacks
Built-in config names (digits, bench-digits, bench-digits-thorough, bench-digits-adaptive,
bench-digits-hardening, bench-caesar, bench-wordpref, caesar, cifar10-paper) can stand in for a CONFIG path."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infusion-audit",
        description="Audit a training pipeline against influence-guided data poisoning (the Infusion attack).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"infusion-audit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch threads per process (default: {DEFAULT_THREADS}, the same arithmetic on every "
                             "machine; bench workers use it too)")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="where train, attack, scan and bench compute: models, gradients, influence, detectors "
                             "(auto: cuda where present, else cpu; default: the config's scenario.train.device, cpu "
                             "unless it says otherwise)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        getattr(module, f"add_{name}_arguments", getattr(module, "add_arguments", None))(p)
        p.set_defaults(handler=getattr(module, f"run_{name}", getattr(module, "run", None)))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        configure(args.threads, args.device)  # before any work: cuda without a CUDA device is one line here
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"infusion-audit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infusion-audit: interrupted; finished results are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- plugins
def add_plugins_arguments(p: argparse.ArgumentParser) -> None:
    from .registry import REGISTRIES

    p.add_argument("--kind", choices=list(REGISTRIES), help="list only one kind")


def run_plugins(args: argparse.Namespace) -> int:
    from .registry import REGISTRIES

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


# --------------------------------------------------------------------------- train
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config with a `scenario:` section, or a built-in name such as digits")
    p.add_argument("--out", required=True, type=Path, help="run directory for checkpoints and metrics")


def run_train(args: argparse.Namespace) -> int:
    from .config import TrainRunConfig, dump_yaml, load_config
    from .io import atomic_write_text
    from .pipeline import Pipeline, train_pipeline

    cfg = load_config(TrainRunConfig, args.config)
    cfg.scenario = cfg.scenario.on_device(args.device)
    atomic_write_text(args.out / "config.yaml", dump_yaml(cfg))
    trained = train_pipeline(Pipeline.from_config(cfg.scenario), args.out / "artefacts", progress=not args.quiet)
    m = trained.metrics
    summary = ", ".join(f"test {name.replace('_', ' ')} {value:.4f}" for name, value in m["test"].items())
    summary += f" (n={m['n_test']}); {m['quality']['figure']} {m['quality']['value']:.4f}"
    print(f"{summary}, {m['train_seconds']:.1f}s; checkpoints in {trained.checkpoints[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
