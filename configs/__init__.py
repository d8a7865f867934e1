"""Training configuration (schema, YAML + overrides, validation); see configs/config.py."""

from configs.config import (
    Config,
    ConfigError,
    flatten,
    from_dict,
    load_config,
    model_kwargs,
    to_dict,
    validate,
)

__all__ = ["Config", "ConfigError", "flatten", "from_dict", "load_config", "model_kwargs", "to_dict",
           "validate"]
