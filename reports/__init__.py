"""HTML reports: Jinja2 templates with autoescape and matplotlib charts embedded as data."""
