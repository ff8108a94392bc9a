"""The tuning planner: one spec (model, hardware, workload) in; vLLM, pool, verl and TRL settings out.

Pure and importable without torch, vllm, verl or trl::

    from rollout_plugin.tuning import MODEL_PRESETS, HARDWARE_PRESETS, WorkloadSpec, make_plan, verl_overrides
    plan = make_plan(MODEL_PRESETS["qwen2.5-7b"], HARDWARE_PRESETS["h100-80"], WorkloadSpec(n=8))
"""

from rollout_plugin.tuning.config import PlanConfig, register_plan_configs, to_specs
from rollout_plugin.tuning.emit import (
    pool_config,
    pool_yaml,
    table,
    trl_kwargs,
    trl_yaml,
    verl_command,
    verl_overrides,
    vllm_args,
    vllm_env,
)
from rollout_plugin.tuning.loader import load_hf_config
from rollout_plugin.tuning.memory import KVEstimate, kv_bytes_per_token, kv_estimate, weight_bytes
from rollout_plugin.tuning.normalize import TrlBatch, VerlBatch
from rollout_plugin.tuning.planner import (
    ConcurrencyPlan,
    EnginePlan,
    Plan,
    Setting,
    colocated_utilization,
    make_plan,
    per_engine_preset,
)
from rollout_plugin.tuning.spec import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    HardwareSpec,
    ModelSpec,
    Pins,
    WorkloadSpec,
    model_from_hf_config,
)

__all__ = [
    "HARDWARE_PRESETS",
    "MODEL_PRESETS",
    "ConcurrencyPlan",
    "EnginePlan",
    "HardwareSpec",
    "KVEstimate",
    "ModelSpec",
    "Pins",
    "Plan",
    "PlanConfig",
    "Setting",
    "TrlBatch",
    "VerlBatch",
    "WorkloadSpec",
    "colocated_utilization",
    "kv_bytes_per_token",
    "kv_estimate",
    "load_hf_config",
    "make_plan",
    "model_from_hf_config",
    "per_engine_preset",
    "pool_config",
    "pool_yaml",
    "register_plan_configs",
    "table",
    "to_specs",
    "trl_kwargs",
    "trl_yaml",
    "verl_command",
    "verl_overrides",
    "vllm_args",
    "vllm_env",
    "weight_bytes",
]
