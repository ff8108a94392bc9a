"""The pool: engines (launch/attach), one HTTP client per engine, admission, routing, failover."""

from rollout_plugin.pool.client import CallError, EngineClient, Generation, HttpEngineClient
from rollout_plugin.pool.dispatch import Dispatcher
from rollout_plugin.pool.stats import EngineStats, PoolStats
from rollout_plugin.pool.launcher import EngineEndpoint, EngineProcess
from rollout_plugin.pool.limits import Limits, derive_limits, preset_per_engine_cap
from rollout_plugin.pool.pool import RolloutPool, SyncRolloutPool, pool_limits

__all__ = [
    "CallError",
    "Dispatcher",
    "EngineClient",
    "EngineEndpoint",
    "EngineProcess",
    "EngineStats",
    "Generation",
    "HttpEngineClient",
    "Limits",
    "PoolStats",
    "RolloutPool",
    "SyncRolloutPool",
    "derive_limits",
    "pool_limits",
    "preset_per_engine_cap",
]
