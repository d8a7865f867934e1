"""The trainer's configuration: the packages' sections composed, YAML + overrides, validation."""

from configs.config import (
    Config,
    ConfigError,
    TrainConfig,
    dump_config,
    flatten,
    from_dict,
    load_config,
    model_kwargs,
    to_dict,
    validate,
)

__all__ = ["Config", "ConfigError", "TrainConfig", "dump_config", "flatten", "from_dict", "load_config",
           "model_kwargs", "to_dict", "validate"]
