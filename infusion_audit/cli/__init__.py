"""The `infusion-audit` command line. Each command lives in its own module of this package exposing
``add_arguments(parser)`` and ``run(args) -> int``; the runtime (threads, device) is set up once, here, before
any command. Exit codes: 0 done; 2 could not be done as asked (a user error, or a full disk), with one line
saying why; 3 a bench whose policy failed (`cli.bench.POLICY_FAILED`); 130 interrupted."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import UserError
from ..io import disk_full
from ..runtime import DEFAULT_THREADS, DEVICES, configure
from ..version import __version__

log = logging.getLogger("infusion_audit")

# name -> one-line help; the command's module is infusion_audit.cli.<name>
COMMANDS = {
    "bench": "attack-then-defend benchmark and its HTML report (default: quick digits benchmark)",
    "attack": "craft poisoned training sets (Infusion and baselines) and measure them against a clean control",
    "scan": "score every document of a suspect dataset by several detectors; ranked CSV + summary",
    "report": "re-render the HTML report of a run directory",
    "train": "train a pipeline; writes a checkpoint per epoch and metrics.json",
    "plugins": "list attacks, detectors, mitigations, datasets and models, and where each came from",
}

EPILOG = """\
examples:
  infusion-audit bench                        quick attack-then-defend benchmark on sklearn digits
  infusion-audit bench bench-caesar --out runs/caesar   the same on the Caesar-cipher language task
  infusion-audit attack digits --out runs/a   craft Infusion poisons on digits and measure them
  infusion-audit scan suspect.npz --reference clean.npz --out runs/s
  infusion-audit plugins
  infusion-audit bench bench-wordpref         word preference on a tiny GPT-Neo (animal stories, the paper's segment)
  infusion-audit bench bench-digits-hardening clip, DP-SGD and partition training against three attacks
Built-in config names (digits, bench-digits, bench-digits-thorough, bench-digits-adaptive,
bench-digits-hardening, bench-caesar, bench-wordpref, caesar, cifar10-paper, mnist) can stand in for a CONFIG path."""


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
                             "(auto: cuda where present, else cpu; default: the config's pipeline.train.device, cpu "
                             "unless it says otherwise)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
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
    except OSError as exc:
        if not disk_full(exc):
            raise
        print(f"infusion-audit: error: {exc.strerror or 'no space left on device'} writing "
              f"{exc.filename or 'the run directory'}; the finished results are kept: free some space and re-run "
              "the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infusion-audit: interrupted; finished results are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
