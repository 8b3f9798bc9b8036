"""Configs: typed YAML (`loading`) and every section of a config file (`sections`)."""

from .loading import (BUILTIN_CONFIGS, PluginSpec, bounded, dump_yaml, from_dict, load_yaml, non_default,
                      resolve_config_path, to_dict)
from .sections import (DEFAULT_ATTACKS, SECTIONS, AttackConfig, AttackSpec, AuditConfig, BudgetConfig, DefenceConfig,
                       InfluenceConfig, PipelineConfig, PolicyConfig, ProtocolConfig, ScanConfig, TargetsConfig,
                       TrainConfig, TriggerConfig, from_sections, load_config, upgrade, with_defaults)

__all__ = ["AttackConfig", "AttackSpec", "AuditConfig", "BUILTIN_CONFIGS", "BudgetConfig", "DEFAULT_ATTACKS",
           "DefenceConfig", "InfluenceConfig", "PipelineConfig", "PluginSpec", "PolicyConfig", "ProtocolConfig",
           "SECTIONS", "ScanConfig", "TargetsConfig", "TrainConfig", "TriggerConfig", "bounded", "dump_yaml",
           "from_dict", "from_sections", "load_config", "load_yaml", "non_default", "resolve_config_path", "to_dict",
           "upgrade", "with_defaults"]
