"""The pool's public API: what users, trainer adapters and the gateway import (nothing deeper).

Inside, one subpackage per responsibility, layered (checked by import-linter, ``[tool.importlinter]`` in
pyproject.toml): ``api`` > ``weights`` > ``dispatch`` | ``engines`` > ``transport`` > ``core`` > ``policy`` |
``observe``. ``docs/architecture.md`` maps each module.
"""

from rollout_plugin.pool.api.blocking import SyncRolloutPool
from rollout_plugin.pool.api.pool import RolloutPool, pool_limits
from rollout_plugin.pool.api.steps import Steps, in_flight_for
from rollout_plugin.pool.core.engine_client import (
    CallError,
    EngineClient,
    Generation,
    Malformed,
    Progress,
    RateLimited,
    Rejected,
    TimedOut,
    Unavailable,
)
from rollout_plugin.pool.dispatch.dispatcher import Dispatcher
from rollout_plugin.pool.engines.launcher import EngineEndpoint, EngineProcess, reserve_ports
from rollout_plugin.pool.engines.placement import gpu_inventory, keep_off_training_gpus
from rollout_plugin.pool.observe.stats import EngineStats, PoolStats
from rollout_plugin.pool.policy.limits import Limits, derive_limits, preset_per_engine_cap
from rollout_plugin.pool.transport.http import HttpEngineClient
from rollout_plugin.pool.transport.rpc import RpcAnswer, require_ok
from rollout_plugin.pool.weights.sources import EngineControl, FolderWeights, InPlaceWeights, UpdateMode, WeightSource

__all__ = [
    "CallError",
    "Dispatcher",
    "EngineClient",
    "EngineControl",
    "EngineEndpoint",
    "EngineProcess",
    "EngineStats",
    "FolderWeights",
    "Generation",
    "HttpEngineClient",
    "InPlaceWeights",
    "Limits",
    "Malformed",
    "PoolStats",
    "Progress",
    "RateLimited",
    "Rejected",
    "RolloutPool",
    "RpcAnswer",
    "Steps",
    "SyncRolloutPool",
    "TimedOut",
    "Unavailable",
    "UpdateMode",
    "WeightSource",
    "derive_limits",
    "gpu_inventory",
    "in_flight_for",
    "keep_off_training_gpus",
    "pool_limits",
    "preset_per_engine_cap",
    "require_ok",
    "reserve_ports",
]
