"""Typed configs (Hydra structured configs) and their validation."""

from rollout_plugin.config.schema import (
    EMBEDDED_MODEL,
    CollectConfig,
    EngineConfig,
    PoolConfig,
    SamplingConfig,
    TimeoutConfig,
    VerifyConfig,
    register_configs,
)
from rollout_plugin.config.validate import Problems, validate_collect

__all__ = [
    "EMBEDDED_MODEL",
    "CollectConfig",
    "EngineConfig",
    "PoolConfig",
    "Problems",
    "SamplingConfig",
    "TimeoutConfig",
    "VerifyConfig",
    "register_configs",
    "validate_collect",
]
