"""The pool: engines (launch/attach), one client per engine, the ledger and its admission, failover."""

from rollout_plugin.pool.client import HttpEngineClient
from rollout_plugin.pool.dispatch import Dispatcher
from rollout_plugin.pool.engine_client import (
    CallError,
    EngineClient,
    Generation,
    Malformed,
    RateLimited,
    Rejected,
    TimedOut,
    Unavailable,
)
from rollout_plugin.pool.launcher import EngineEndpoint, EngineProcess
from rollout_plugin.pool.limits import Limits, derive_limits, preset_per_engine_cap
from rollout_plugin.pool.operations import ControlAnswer
from rollout_plugin.pool.pool import RolloutPool, pool_limits
from rollout_plugin.pool.stats import EngineStats, PoolStats
from rollout_plugin.pool.steps import Steps
from rollout_plugin.pool.sync import SyncRolloutPool
from rollout_plugin.pool.weights import FolderWeights, UpdateMode, WeightSource

__all__ = [
    "CallError",
    "ControlAnswer",
    "Dispatcher",
    "EngineClient",
    "EngineEndpoint",
    "EngineProcess",
    "EngineStats",
    "FolderWeights",
    "Generation",
    "HttpEngineClient",
    "Limits",
    "Malformed",
    "PoolStats",
    "RateLimited",
    "Rejected",
    "RolloutPool",
    "Steps",
    "SyncRolloutPool",
    "TimedOut",
    "Unavailable",
    "UpdateMode",
    "WeightSource",
    "derive_limits",
    "pool_limits",
    "preset_per_engine_cap",
]
