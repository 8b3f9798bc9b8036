"""TEMPORARY shim until the results slice lands."""
from ..reports.render import load_records as _load_records, summarise_run


def load_records(run_dir):
    from pathlib import Path
    return _load_records(Path(run_dir))


def summarise(records):
    return summarise_run(records)


def format_table(summary):
    return "\n".join(f"{a['label']} {a['budget']}: {a['delta_logodds']}" for a in summary["attacks"])
