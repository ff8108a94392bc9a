"""A :class:`Plan` in the shapes people paste: verl overrides, TRL ``GRPOConfig`` kwargs, vLLM server
arguments, this project's engine/pool config, and a (setting, value, reason) table.

Every verl key emitted here exists in verl 0.9's ``ppo_trainer`` config (tests/trainers/ composes
them onto it and runs verl's ``validate_config``), so no ``+key=`` is needed.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from rollout_plugin.config.schema import EngineConfig, PoolConfig
from rollout_plugin.tuning.planner import Plan

VERL_COMMAND = "python -m verl.trainer.main_ppo"


def _hydra(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def verl_overrides(plan: Plan) -> list[str]:
    """Hydra overrides for ``python -m verl.trainer.main_ppo`` (``key=value``, no ``+``: all keys exist)."""
    w, e, v = plan.workload, plan.engine, plan.verl
    nodes, per_node = _train_topology(plan)
    actor = "actor_rollout_ref.actor"
    ref = "actor_rollout_ref.ref"
    rollout = "actor_rollout_ref.rollout"
    items: list[tuple[str, object]] = [
        ("algorithm.adv_estimator", w.adv_estimator),
        ("data.train_batch_size", w.train_batch_size),
        ("data.max_prompt_length", w.max_prompt_length),
        ("data.max_response_length", w.max_response_length),
        ("actor_rollout_ref.model.path", plan.model.path or plan.model.name),
        ("actor_rollout_ref.model.enable_gradient_checkpointing", True),
        # Ulysses SP requires it, and it saves the padding's compute everywhere else.
        ("actor_rollout_ref.model.use_remove_padding", True),
        (f"{actor}.ppo_mini_batch_size", w.ppo_mini_batch_size),
        (f"{actor}.ppo_micro_batch_size_per_gpu", v.micro_batch_per_gpu),
        (f"{actor}.use_dynamic_bsz", True),
        (f"{actor}.ppo_max_token_len_per_gpu", v.ppo_max_token_len_per_gpu),
        (f"{actor}.ulysses_sequence_parallel_size", v.ulysses_sp),
        (f"{actor}.fsdp_config.param_offload", w.offload),
        (f"{actor}.fsdp_config.optimizer_offload", w.offload),
        (f"{ref}.log_prob_micro_batch_size_per_gpu", v.log_prob_micro_batch_per_gpu),
        (f"{ref}.log_prob_use_dynamic_bsz", True),
        (f"{ref}.log_prob_max_token_len_per_gpu", v.log_prob_max_token_len_per_gpu),
        (f"{ref}.fsdp_config.param_offload", w.offload),
        (f"{rollout}.name", "vllm"),
        (f"{rollout}.n", w.n),
        (f"{rollout}.tensor_model_parallel_size", e.tensor_parallel_size),
        (f"{rollout}.gpu_memory_utilization", e.gpu_memory_utilization),
        (f"{rollout}.max_model_len", e.max_model_len),
        (f"{rollout}.max_num_batched_tokens", e.max_num_batched_tokens),
        (f"{rollout}.max_num_seqs", e.max_num_seqs),
        (f"{rollout}.enable_prefix_caching", e.enable_prefix_caching),
        (f"{rollout}.disable_log_stats", e.disable_log_stats),
        (f"{rollout}.log_prob_micro_batch_size_per_gpu", v.log_prob_micro_batch_per_gpu),
        (f"{rollout}.log_prob_use_dynamic_bsz", True),
        (f"{rollout}.log_prob_max_token_len_per_gpu", v.log_prob_max_token_len_per_gpu),
    ]
    if v.critic_micro_batch_per_gpu is not None:
        items += [
            ("critic.model.path", plan.model.path or plan.model.name),
            ("critic.model.enable_gradient_checkpointing", True),
            ("critic.ppo_micro_batch_size_per_gpu", v.critic_micro_batch_per_gpu),
            ("critic.forward_micro_batch_size_per_gpu", v.critic_forward_micro_batch_per_gpu),
            ("critic.use_dynamic_bsz", True),
            ("critic.ppo_max_token_len_per_gpu", v.critic_ppo_max_token_len_per_gpu),
            ("critic.forward_max_token_len_per_gpu", v.critic_forward_max_token_len_per_gpu),
            ("critic.ulysses_sequence_parallel_size", v.ulysses_sp),
            ("critic.fsdp.param_offload", w.offload),
            ("critic.fsdp.optimizer_offload", w.offload),
        ]
    items += [("trainer.nnodes", nodes), ("trainer.n_gpus_per_node", per_node)]
    return [f"{k}={_hydra(val)}" for k, val in items]


def _train_topology(plan: Plan) -> tuple[int, int]:
    """verl's trainer.nnodes × n_gpus_per_node for the training GPUs (the planner checked they are whole nodes)."""
    per_node = plan.hardware.gpus_per_node
    if plan.train_gpus % per_node == 0:
        return plan.train_gpus // per_node, per_node
    return 1, plan.train_gpus


def verl_command(plan: Plan) -> str:
    """The overrides as a paste-able shell continuation.

    No environment to export: verl 0.9 never reads RAY_MAX_CONCURRENCY (it sizes each server actor's
    concurrency from max_num_seqs itself); the planner's table keeps the value for Xtuner.
    """
    lines = [f"# paste after `{VERL_COMMAND}`"]
    overrides = verl_overrides(plan)
    lines += [f"    {o} \\" for o in overrides[:-1]] + [f"    {overrides[-1]}"]
    return "\n".join(lines)


def trl_kwargs(plan: Plan) -> dict[str, Any] | None:
    """Keyword arguments for ``trl.GRPOConfig`` (None where TRL cannot run the workload; see plan.notes)."""
    t, e, w = plan.trl, plan.engine, plan.workload
    if t is None:
        return None
    kwargs: dict[str, Any] = {
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "generation_batch_size": t.generation_batch_size,
        "num_generations": t.num_generations,
        "num_iterations": 1,
        "max_completion_length": w.max_response_length,
        "gradient_checkpointing": True,
        "bf16": plan.model.dtype == "bfloat16",
        "use_vllm": True,
        "vllm_mode": "colocate" if w.placement == "colocated" else "server",
        "vllm_max_model_length": e.max_model_len,
    }
    if w.placement == "colocated":
        kwargs["vllm_gpu_memory_utilization"] = e.gpu_memory_utilization
        kwargs["vllm_tensor_parallel_size"] = e.tensor_parallel_size
    return kwargs


def trl_yaml(plan: Plan) -> str | None:
    kwargs = trl_kwargs(plan)
    if kwargs is None:
        return None
    return "".join(f"{k}: {_yaml_scalar(v)}\n" for k, v in kwargs.items())


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def vllm_args(plan: Plan) -> list[str]:
    """``vllm serve`` arguments for one engine (the model first)."""
    e = plan.engine
    args = [plan.model.path or plan.model.name, "--dtype", e.dtype,
            "--tensor-parallel-size", str(e.tensor_parallel_size),
            "--max-model-len", str(e.max_model_len),
            "--max-num-batched-tokens", str(e.max_num_batched_tokens),
            "--max-num-seqs", str(e.max_num_seqs),
            "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching"]
    if plan.hardware.kind == "gpu":
        args += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    # Stats logging stays on: vLLM logs them unless --disable-log-stats is given, so nothing to add.
    return args


def vllm_env(plan: Plan) -> dict[str, str]:
    """Environment for one engine: a CPU engine takes its KV cache size from VLLM_CPU_KVCACHE_SPACE (GiB)."""
    if plan.hardware.kind == "cpu":
        return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(plan.engine.kv_cache_gib)))}
    return {}


def pool_config(plan: Plan) -> tuple[EngineConfig, PoolConfig]:
    """This project's engine and pool configs, filled from the plan (other fields keep their defaults)."""
    e, c = plan.engine, plan.concurrency
    engine = EngineConfig(
        model=plan.model.path or plan.model.name, dtype=e.dtype, gpu_memory_utilization=e.gpu_memory_utilization,
        max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
        tensor_parallel_size=e.tensor_parallel_size, enable_prefix_caching=e.enable_prefix_caching,
    )
    if plan.hardware.kind == "cpu":
        engine.cpu_kvcache_gb = max(0.1, plan.engine.kv_cache_gib)
    pool = PoolConfig(engines=e.engines, k=plan.workload.n, per_engine=c.per_engine,
                      over_concurrency_ratio=c.over_concurrency_ratio, max_concurrent=c.max_concurrent)
    return engine, pool


def pool_yaml(plan: Plan) -> str:
    """The planned engine/pool fields as YAML (the keys of ``hydra_conf`` collect configs)."""
    engine, pool = pool_config(plan)
    e_keys = ["model", "dtype", "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
              "tensor_parallel_size", "enable_prefix_caching"] + (["cpu_kvcache_gb"] if plan.hardware.kind == "cpu"
                                                                   else [])
    p_keys = ["engines", "k", "per_engine", "over_concurrency_ratio", "max_concurrent"]
    lines = ["engine:"] + [f"  {k}: {_yaml_scalar(getattr(engine, k))}" for k in e_keys]
    lines += ["pool:"] + [f"  {k}: {_yaml_scalar(getattr(pool, k))}" for k in p_keys]
    return "\n".join(lines) + "\n"


def table(plan: Plan, width: int | None = None) -> str:
    """Setting, value, reason: one row per decision, reasons wrapped to the terminal."""
    width = width or max(100, shutil.get_terminal_size((120, 40)).columns)
    m, h, w = plan.model, plan.hardware, plan.workload
    head = (f"plan: {m.name} ({m.num_params / 1e9:.2f}B, {m.dtype}) on {h.nodes}×{h.gpus_per_node} {h.name} "
            f"({h.gpu_memory_gib} GiB), {w.placement}, n={w.n}, prompt {w.max_prompt_length} + response "
            f"{w.max_response_length}, batch {w.train_batch_size}/{w.ppo_mini_batch_size} prompts")
    k_w = max(len(s.key) for s in plan.settings)
    v_w = max(len(str(s.value)) for s in plan.settings)
    r_w = max(30, width - k_w - v_w - 4)
    out = [head, "", f"{'setting':<{k_w}}  {'value':<{v_w}}  reason", "-" * min(width, k_w + v_w + 4 + r_w)]
    for s in plan.settings:
        wrapped = textwrap.wrap(s.reason, r_w) or [""]
        out.append(f"{s.key:<{k_w}}  {str(s.value):<{v_w}}  {wrapped[0]}")
        out += [f"{'':<{k_w}}  {'':<{v_w}}  {line}" for line in wrapped[1:]]
    if plan.notes:
        out += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(out)
