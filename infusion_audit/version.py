"""The installed distribution's version (a leaf module: anything may import it without a cycle)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("infusion-audit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
