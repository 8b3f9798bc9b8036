"""Scanning a suspect dataset: the Python API (`api`) and what it accepts (`inputs`); the command is `cli.scan`."""

from .api import ScanResult, scan

__all__ = ["ScanResult", "scan"]
