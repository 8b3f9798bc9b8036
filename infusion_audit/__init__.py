"""infusion-audit: audit training pipelines against influence-guided data poisoning.

The command line's jobs are one call each from Python: `bench(...)` (attack-then-defend benchmark,
returns a BenchResult) and `scan(...)` (score a suspect dataset with detectors: arrays, a torch
Dataset or the project's datasets, with any torch model; returns a ScanResult). `Pipeline` is what a
team subclasses to audit its own training (model, training loop, data). Anything they cannot use raises
UserError (DataError for data, ConfigError for configs) with a one-line message."""

# The functions take the submodules' names on purpose: `infusion_audit.bench(...)` runs a benchmark.
from .bench import BenchResult, bench
from .errors import ConfigError, DataError, UserError
from .pipeline import Pipeline
from .scan import ScanResult, scan
from .training import Checkpoint
from .version import __version__

__all__ = ["__version__", "bench", "BenchResult", "Checkpoint", "Pipeline", "scan", "ScanResult", "UserError",
           "DataError", "ConfigError"]
