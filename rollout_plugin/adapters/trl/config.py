"""Typed config of ``rollout-plugin trl-grpo`` (stdlib + the pool's schemas: no TRL or torch at import).

``trl:`` is passed to ``trl.GRPOConfig`` as keyword arguments (checked against its fields, all
unknown keys reported at once); ``engine:``/``pool:``/``controller:`` configure the rollout pool.
:class:`AsyncRolloutConfig` configures the AsyncGRPOTrainer route (used from Python: ``trl-grpo`` runs GRPOTrainer).
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
    # nccl: vLLM's packed transfer; each engine worker allocates nccl_num_buffers receive buffers of this size
    # outside vLLM's gpu_memory_utilization (the planner keeps room for them: tuning.memory.nccl_update_bytes).
    nccl_buffer_mib: int = 1024
    nccl_num_buffers: int = 2


# Built with the functional API so each member's *name* is its value: OmegaConf parses an enum by member name,
# and ``continue`` cannot be written as a class attribute.
WeightUpdateMode = Enum("WeightUpdateMode", {m: m for m in ("drain", "keep", "continue", "restart")}, type=str)


@dataclass
class AsyncRolloutConfig:
    """The AsyncGRPOTrainer route: :class:`~.async_worker.PoolRolloutWorker` and its ``PoolWeightTransfer``.

    The worker keeps ``in_flight`` groups generating and queues each one for training the moment it is whole, so
    no group waits for a slower one; a weight sync carries the groups still generating into the new version
    (``update_mode``) instead of waiting for them."""

    # Groups generating at once, relative to the step: unset, 2 × groups_per_step (rollout_plugin.pool.api.steps
    # IN_FLIGHT_PER_STEP: the step's groups and the next step's, so slow groups carry over and the fleet never
    # runs dry while the trainer trains). A fixed 8 starved 64 engines (benchmarks/RESULTS.md, session 5).
    in_flight: Optional[int] = None
    # Groups one optimizer step takes: per_device_train_batch_size × gradient_accumulation_steps × processes /
    # num_generations. Needed when in_flight is unset.
    groups_per_step: Optional[int] = None
    queue_maxsize: int = 64  # scored samples waiting for the trainer; a full queue holds generation back
    # How a weight sync crosses groups still generating (rollout_plugin.pool.weights.sources): continue (their tokens so far
    # are kept, the rest generated under the new weights; the default until measured against keep), keep (frozen in
    # the engines with their KV cache; engines in dev mode), drain (the sync waits for them: strictly one version
    # per sample), restart (generated again from scratch).
    update_mode: WeightUpdateMode = WeightUpdateMode["continue"]
    # A sample may span at most this many versions back: older work starts over at the sync instead of finishing
    # only to be dropped. Set it to AsyncGRPOConfig.max_staleness; unset: never restarted (the trainer still drops).
    max_staleness: Optional[int] = None


def resolved_in_flight(cfg: AsyncRolloutConfig) -> int:
    """Groups to keep in flight: ``in_flight`` when set, else relative to ``groups_per_step``."""
    from rollout_plugin.errors import ConfigError, ConfigProblem
    from rollout_plugin.pool import in_flight_for

    if cfg.in_flight is not None:
        return cfg.in_flight
    if cfg.groups_per_step is not None:
        return in_flight_for(cfg.groups_per_step)
    raise ConfigError([ConfigProblem(
        "groups_per_step", None, "unset, and so is in_flight: groups in flight follow the step (2 × the groups one "
        "optimizer step takes = per_device_train_batch_size × gradient_accumulation_steps × processes / "
        "num_generations)", "groups_per_step=<groups per step>")])


def checked_async_config(config: AsyncRolloutConfig | None, overrides: dict[str, Any]) -> AsyncRolloutConfig:
    """``config`` with keyword ``overrides`` applied, every problem reported at once (keys named as the fields)."""
    import dataclasses

    from rollout_plugin.config.validate import Problems, nearest_key
    from rollout_plugin.errors import ConfigProblem

    names = [f.name for f in dataclasses.fields(AsyncRolloutConfig)]
    problems = Problems()
    for key, value in overrides.items():
        if key not in names:
            near = nearest_key(key, names)
            problems.items.append(ConfigProblem(key, value, "not a setting of the async route",
                                                f"{near}=…" if near else None))
    problems.raise_if_any()
    cfg = dataclasses.replace(config or AsyncRolloutConfig(), **overrides)
    problems.at_least("in_flight", cfg.in_flight, 1)
    problems.at_least("groups_per_step", cfg.groups_per_step, 1)
    problems.at_least("queue_maxsize", cfg.queue_maxsize, 1)
    problems.at_least("max_staleness", cfg.max_staleness, 0)
    try:
        cfg.update_mode = WeightUpdateMode[getattr(cfg.update_mode, "value", cfg.update_mode)]
    except KeyError:
        problems.add("update_mode", cfg.update_mode, "not a weight-update mode (drain, keep, continue, restart)",
                     "continue")
    problems.raise_if_any()
    return cfg


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


def weights_problems(cfg: WeightsConfig, colocate: bool) -> list:
    """What is wrong in ``weights:`` (and its cross-check with ``engine.colocate``), every problem at once."""
    from rollout_plugin.config.validate import Problems

    p = Problems()
    p.at_least("weights.nccl_buffer_mib", cfg.nccl_buffer_mib, 1)
    p.at_least("weights.nccl_num_buffers", cfg.nccl_num_buffers, 1)
    if cfg.timeout_s <= 0:
        p.add("weights.timeout_s", cfg.timeout_s, "must be > 0", 600.0)
    if str(getattr(cfg.transport, "value", cfg.transport)) == "nccl" and colocate:
        # vLLM puts trainer rank 0 and every engine worker in one NCCL communicator (NCCLTrainerWeightTransferEngine):
        # an engine on rank 0's GPU is a duplicate GPU there, which NCCL refuses.
        p.add("weights.transport", "nccl", "cannot be combined with engine.colocate=true: vLLM's NCCL transfer "
              "puts trainer rank 0 and every engine worker in one communicator, and an engine on rank 0's GPU is a "
              "duplicate GPU NCCL refuses (colocated engines take weights through vLLM's IPC transfer engine, or "
              "the folder)", "folder, or engine.colocate=false")
    return p.items


def register_trl_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from rollout_plugin.config.schema import register_configs

    register_configs()
    ConfigStore.instance().store(name="trl_grpo_schema", node=TrlGrpoConfig)
