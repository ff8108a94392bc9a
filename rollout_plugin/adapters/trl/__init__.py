"""TRL adapter: the rollout pool as GRPOTrainer's generation backend, as a ``rollout_func``, as
AsyncGRPOTrainer's rollout worker, plus the callback that syncs weights and logs pool metrics.

Imports TRL (and torch) only when one of these names is first used; supports trl 1.16.x.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attach": "rollout_plugin.adapters.trl.backend",
    "make_pool": "rollout_plugin.adapters.trl.ranks",
    "WeightsConfig": "rollout_plugin.adapters.trl.config",
    "AsyncRolloutConfig": "rollout_plugin.adapters.trl.config",
    "PoolGeneration": "rollout_plugin.adapters.trl.backend",
    "RolloutPoolCallback": "rollout_plugin.adapters.trl.callback",
    "make_rollout_func": "rollout_plugin.adapters.trl.rollout",
    "PoolRolloutWorker": "rollout_plugin.adapters.trl.async_worker",
    "PoolWeightTransfer": "rollout_plugin.adapters.trl.async_worker",
    "async_grpo_on_cpu": "rollout_plugin.adapters.trl.async_worker",
    "WeightSync": "rollout_plugin.adapters.trl.weights",
    "apply_plan": "rollout_plugin.adapters.trl.plan",
    "require_trl": "rollout_plugin.adapters.trl.compat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
