"""Training configuration (schema, YAML + overrides, validation); see configs/config.py."""

from configs.config import (
    Config,
    ConfigError,
    dump_config,
    flatten,
    from_dict,
    load_config,
    model_kwargs,
    to_dict,
    validate,
)

__all__ = ["Config", "ConfigError", "dump_config", "flatten", "from_dict", "load_config", "model_kwargs",
           "to_dict", "validate"]
