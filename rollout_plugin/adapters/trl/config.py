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

    path: str = "rollout_plugin.adapters.trl.tasks:correctness_reward"  # pkg.module:name
    kwargs: dict[str, Any] = field(default_factory=dict)  # given: path names a factory, called with them


@dataclass
class DatasetSpec:
    """A function returning a ``datasets.Dataset`` with a ``prompt`` column, called with ``kwargs``."""

    path: str = "rollout_plugin.adapters.trl.tasks:arith_dataset"  # pkg.module:name of a function
    kwargs: dict[str, Any] = field(default_factory=dict)  # its keyword arguments


class WeightTransport(str, Enum):
    folder = "folder"  # safetensors in a folder every engine reads, reloaded in place (CPU and GPU; the default)
    nccl = "nccl"  # vLLM's NCCL weight-transfer engine (GPU, --weight-transfer-config; not yet run on a GPU)


@dataclass
class WeightsConfig:
    """How the trainer's weights reach the engines after each optimizer step."""

    transport: WeightTransport = WeightTransport.folder
    dir: Optional[str] = None  # folder: shared by trainer and engines; unset: <trl.output_dir>/rollout_weights
    nccl_host: Optional[str] = None  # nccl: the address engines reach trainer rank 0 at; unset: this host's IP
    nccl_port: int = 51216  # nccl: the group's rendezvous port (TRL's vllm_group_port)
    timeout_s: float = 600.0  # one sync (reload or transfer) on every engine


@dataclass
class TrlGrpoConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    trl: dict[str, Any] = field(default_factory=dict)  # GRPOConfig keyword arguments
    trainer_model: Optional[str] = None  # the trainer's model; unset: engine.model (same architecture and names)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # GRPOTrainer's reward_funcs, in order
    route: Route = Route.backend
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    apply_plan: bool = True  # fill trainer settings the user left at TRL's defaults from the planner
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR


def register_trl_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from rollout_plugin.config.schema import register_configs

    register_configs()
    ConfigStore.instance().store(name="trl_grpo_schema", node=TrlGrpoConfig)
