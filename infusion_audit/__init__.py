"""infusion-audit: audit training pipelines against influence-guided data poisoning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("infusion-audit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
