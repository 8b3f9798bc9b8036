"""Results: the records a run writes (typed and versioned), the one summary of them, and the verdict's rules.

A foundation layer: it reads and summarises records and never runs an attack, a detector or a report.
"""

from .records import (SCHEMA, AttackRecord, DefenceRecord, DetectionRecord, EffectRecord, ErrorRecord, MitigationRecord,
                      Record, SkipRecord, by_kind, load_records)
from .summary import format_table, summarise

__all__ = ["SCHEMA", "AttackRecord", "DefenceRecord", "DetectionRecord", "EffectRecord", "ErrorRecord", "MitigationRecord",
           "Record", "SkipRecord", "by_kind", "format_table", "load_records", "summarise"]
