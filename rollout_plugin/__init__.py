"""rollout-plugin: a concurrency-managed pool of vLLM servers for RL trainers' rollout stage.

Imports neither torch nor vllm: engines are reached over HTTP.
"""

from rollout_plugin.config.schema import (
    CollectConfig,
    EngineConfig,
    PoolConfig,
    PrewarmConfig,
    SamplingConfig,
    VerifyConfig,
)
from rollout_plugin.gateway.server import ServeConfig
from rollout_plugin.errors import (
    ConfigError,
    EngineError,
    EngineStartError,
    InputError,
    PoolError,
    RolloutPluginError,
    VerifierError,
)
from rollout_plugin.pool import PoolStats
from rollout_plugin.pool import RolloutPool, SyncRolloutPool
from rollout_plugin.pool import FolderWeights, UpdateMode
from rollout_plugin.types import Request, Result, Sample, SamplingParams, Segment
from rollout_plugin.verify import VerifierRunner, VerifyCache, VerifyJobConfig

__version__ = "0.1.0"

__all__ = [
    "CollectConfig",
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "EngineStartError",
    "FolderWeights",
    "InputError",
    "PoolConfig",
    "PoolError",
    "PoolStats",
    "PrewarmConfig",
    "Request",
    "Result",
    "RolloutPluginError",
    "RolloutPool",
    "Sample",
    "Segment",
    "SamplingConfig",
    "SamplingParams",
    "ServeConfig",
    "SyncRolloutPool",
    "UpdateMode",
    "VerifierError",
    "VerifierRunner",
    "VerifyCache",
    "VerifyConfig",
    "VerifyJobConfig",
    "__version__",
]
