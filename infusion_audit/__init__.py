"""infusion-audit: audit training pipelines against influence-guided data poisoning.

The command line's jobs are one call each from Python: `bench(...)` (attack-then-defend benchmark
and report) and `scan(...)` (score a suspect dataset with detectors)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("infusion-audit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# The functions take the submodules' names on purpose: `infusion_audit.bench(...)` runs a benchmark.
from .bench import bench  # noqa: E402
from .scan import scan  # noqa: E402

__all__ = ["__version__", "bench", "scan"]
