"""infusion-audit: audit training pipelines against influence-guided data poisoning.

The command line's jobs are one call each from Python: `bench(...)` (attack-then-defend benchmark,
returns a BenchResult) and `scan(...)` (score a suspect dataset with detectors: arrays, a torch
Dataset or the project's datasets, with any torch model; returns a ScanResult). Anything they cannot
use raises UserError (DataError for data, ConfigError for configs) with a one-line message."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("infusion-audit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# The functions take the submodules' names on purpose: `infusion_audit.bench(...)` runs a benchmark.
from .bench import BenchResult, bench  # noqa: E402
from .errors import ConfigError, DataError, UserError  # noqa: E402
from .scan import ScanResult, scan  # noqa: E402

__all__ = ["__version__", "bench", "BenchResult", "scan", "ScanResult", "UserError", "DataError", "ConfigError"]
