"""Typed config of ``rollout-plugin trl-grpo`` (stdlib + the pool's schemas: no TRL or torch at import).

``trl:`` is passed to ``trl.GRPOConfig`` as keyword arguments (checked against its fields, all
unknown keys reported at once); ``engine:``/``pool:``/``controller:`` configure the rollout pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig


class Route(str, Enum):
    backend = "backend"  # attach(): the pool stands in for TRL's vLLM generation (keeps IS correction)
    rollout_func = "rollout_func"  # TRL's public rollout_func hook (no IS correction)


@dataclass
class RewardSpec:
    """A reward function by dotted path (``pkg.module:name``); with ``kwargs``, ``name`` is a factory called with them."""

    path: str = "rollout_plugin.adapters.trl.tasks:correctness_reward"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """A function returning a ``datasets.Dataset`` with a ``prompt`` column, called with ``kwargs``."""

    path: str = "rollout_plugin.adapters.trl.tasks:arith_dataset"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrlGrpoConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    trl: dict[str, Any] = field(default_factory=dict)  # GRPOConfig keyword arguments
    trainer_model: Optional[str] = None  # the trainer's model; unset: engine.model (same architecture and names)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    route: Route = Route.backend
    weights_dir: Optional[str] = None  # shared folder for weight sync; unset: <trl.output_dir>/rollout_weights
    apply_plan: bool = True  # fill trainer settings the user left at TRL's defaults from the planner
    log_level: str = "INFO"


def register_trl_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from rollout_plugin.config.schema import register_configs

    register_configs()
    ConfigStore.instance().store(name="trl_grpo_schema", node=TrlGrpoConfig)
