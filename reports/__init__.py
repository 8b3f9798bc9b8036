"""HTML reports: Jinja2 templates with autoescape and matplotlib charts embedded as data."""

from .render import render_report, render_scan_report

__all__ = ["render_report", "render_scan_report"]
