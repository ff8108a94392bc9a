"""Typed config of ``rollout-plugin simulate`` (registered in Hydra's ConfigStore; no torch, no vllm).

The pool, controller and sampling-free engine knobs are the real ones (:mod:`rollout_plugin.config.schema`):
the simulator drives the same pool code, so ``pool.pack_size=16`` means the same thing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from rollout_plugin.config.schema import ControllerConfig, PoolConfig


class Policy(str, Enum):
    pool = "pool"  # RolloutPool, adaptive per-engine caps (controller.mode from the config)
    pool_fixed = "pool_fixed"  # RolloutPool with the controller off: fixed Xtuner-preset caps
    static = "static"  # TRL server mode / static DP: group i -> engine i mod N, all at once
    verl = "verl"  # verl's router: least in flight by request count, no cap, all at once, sticky per session
    least_loaded = "least_loaded"  # cache-unaware: every turn to the least in flight, no cap, all at once
    distllm = "distllm"  # fixed batches (+ timeout), one batch at a time


@dataclass
class WorkloadConfig:
    """GRPO-shaped: ``prompts`` × ``k`` samples, lognormal lengths, optional multi-turn sessions."""

    prompts: int = 4096  # groups per step; prompts_per_engine wins when set
    prompts_per_engine: Optional[int] = 32  # weak scaling: prompts = this × engines
    k: int = 8  # samples per prompt (GRPO group size)
    prompt_tokens_median: int = 256  # lengths are lognormal around these medians
    prompt_tokens_sigma: float = 0.5  # lognormal sigma of prompt lengths
    output_tokens_median: int = 400  # completion tokens, median
    output_tokens_sigma: float = 0.8  # GRPO's long tail: a few samples run to max_tokens
    max_tokens: int = 2048  # completions are cut here
    turns: int = 1  # >1: each sample is a session of this many turns (n=1 calls, prompt grows)
    tool_latency_s: float = 0.5  # between turns
    tool_tokens: int = 64  # tool output appended to the prompt each turn
    # Multi-turn prompts as chat messages (one conversation per call, as agent loops send them); false: text
    # prompts, which the pool packs up to pool.pack_size per call — and a packed call returns when its slowest
    # member does, so every session's next turn waits for the others (see benchmarks/RESULTS.md).
    chat: bool = True
    # Multi-turn: each turn carries the affinity keys verl's router gives it (its group's prompt on the first
    # turn, then its session's), so the pool can keep a session where its prefix is cached; false: none.
    affinity: bool = True
    seed: int = 0  # the lengths drawn; every policy gets the same ones
    # A whole RL run (single-turn only): `steps` trainer steps of `prompts` groups each; the trainer takes
    # `train_s` per step, then the weights go to the engines (the profile's bytes over its bandwidth).
    # Baselines run synchronously (generate the whole step, train, update); the pool keeps a step's quota
    # plus carry-over in flight (pool.steps) and crosses updates in `update_mode` within `max_staleness`.
    steps: int = 1
    train_s: float = 0.0
    update_mode: str = "continue"  # keep, continue, drain or restart (rollout_plugin.pool.weights.sources.UpdateMode)
    max_staleness: int = 1  # weight versions a trained sample may lag (one-step-off, as verl and AReaL run it)


@dataclass
class FleetConfig:
    engines: list[int] = field(default_factory=lambda: [8, 64, 256, 1024])  # fleet sizes, each simulated in turn
    profile: str = "h100_llama8b"  # built-in profile name or a JSON path
    max_model_len: int = 4096  # sets the pool's per-engine cap preset, as for real engines
    # vLLM's automatic prefix cache on every engine (hashed full blocks of the profile's block_size, LRU
    # eviction from the KV left over): a hit is not prefilled; false: every prompt is prefilled in full.
    prefix_cache: bool = True
    kv_tokens: Optional[int] = None  # KV capacity per engine in tokens, instead of the profile's (null: keep)
    straggler_fraction: float = 0.0  # share of engines that run slower
    straggler_slowdown: float = 3.0  # their step time × this
    failure_fraction: float = 0.0  # share of engines that die mid-run
    failure_at_s: float = 30.0  # when (simulated seconds)
    seed: int = 0  # which engines straggle or die


@dataclass
class BaselineConfig:
    distllm_batch: int = 16  # groups per batch, per engine (distllm's batch of 16, scaled to the fleet)
    distllm_timeout_s: float = 0.5  # distllm's batch timeout: a short batch goes after this long
    retries: int = 3  # a failed call goes to the next engine, as a client-side retry would


@dataclass
class SimulateConfig:
    fleet: FleetConfig = field(default_factory=FleetConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    # pool_fixed (the pool with its controller off) is left out by default: 1,024 engines stay under a minute.
    policies: list[Policy] = field(default_factory=lambda: [Policy.pool, Policy.static, Policy.verl, Policy.distllm])
    exact_metrics: bool = False  # parse every simulated /metrics text as the real monitor does (slow)
    horizon_s: float = 86400.0  # simulated seconds before a run is called stuck
    output: Optional[str] = None  # JSON of every run
    plot: Optional[str] = None  # PNG: tokens/s and makespan vs engines, one line per policy
    log_level: str = "ERROR"  # the pool logs every simulated failure at WARNING: 10³ lines per dead node


def register_sim_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="simulate_schema", node=SimulateConfig)
