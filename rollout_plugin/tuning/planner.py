"""The planner: model + hardware + workload in; engine, pool and trainer settings out, each with its reason.

Pure: frozen dataclasses in, a frozen :class:`Plan` out, no I/O. Inconsistent input raises one
:class:`~rollout_plugin.errors.ConfigError` listing every problem, each with the key, the value and
the nearest valid value. Rules come from the veRL perf-tuning guide (utilization, batch sizes, dynamic
batching, Ulysses), NeMo Gym (max_model_len, max_num_batched_tokens, dedicated utilization) and Xtuner
(per-engine caps, over-concurrency, max_concurrent, HTTP connections; RAY_MAX_CONCURRENCY, which only
Xtuner reads).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from rollout_plugin.config.validate import Problems
from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.tuning.memory import (
    KVEstimate,
    forward_bytes_per_token,
    forward_token_budget,
    kv_estimate,
    train_bytes_per_token,
    train_state_bytes_per_gpu,
    train_token_budget,
    utilization_leaving,
)
from rollout_plugin.tuning.normalize import TrlBatch, VerlBatch, check_divisibility, trl_batch, verl_batch
from rollout_plugin.tuning.spec import GIB, HARDWARE_PRESETS, HardwareSpec, ModelSpec, Pins, WorkloadSpec

log = logging.getLogger(__name__)

# Xtuner's presets for rollout_max_batch_size_per_instance, by context length (beyond 32K: 64).
PER_ENGINE_PRESETS = ((4096, 1024), (16384, 512), (32768, 128))
PER_ENGINE_LONG = 64
RAY_DEFAULT_MAX_CONCURRENCY = 1024
MIN_BATCHED_TOKENS = 8192  # NeMo Gym's value; veRL: "> 2048"
# Below this many running sequences decode is memory-bound and the GPU mostly idles.
USEFUL_BATCH = 16
UTIL_DEDICATED = 0.9
UTIL_COLOCATED_OFFLOAD = 0.8
UTIL_COLOCATED_RANGE = (0.5, 0.7)


@dataclass(frozen=True)
class Setting:
    key: str
    value: object
    reason: str


@dataclass(frozen=True)
class EnginePlan:
    tensor_parallel_size: int
    engines: int
    gpu_memory_utilization: float
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_prefix_caching: bool
    disable_log_stats: bool
    dtype: str
    kv: KVEstimate

    @property
    def kv_cache_gib(self) -> float:
        """The KV budget per GPU in GiB (what a CPU engine is given as its KV cache size)."""
        return round(max(self.kv.kv_per_gpu, 0) / GIB, 1)


@dataclass(frozen=True)
class ConcurrencyPlan:
    per_engine: int
    over_concurrency_ratio: float
    max_concurrent: int  # groups in flight across the pool
    ray_max_concurrency: int
    http_max_connections: int  # per engine


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    hardware: HardwareSpec
    workload: WorkloadSpec
    pins: Pins
    rollout_gpus: int
    train_gpus: int
    engine: EnginePlan
    concurrency: ConcurrencyPlan
    verl: VerlBatch
    trl: Optional[TrlBatch]  # None where TRL's GRPO cannot run this workload (see notes)
    settings: tuple[Setting, ...]
    notes: tuple[str, ...]


def per_engine_preset(max_model_len: int) -> int:
    return next((cap for limit, cap in PER_ENGINE_PRESETS if max_model_len <= limit), PER_ENGINE_LONG)


def make_plan(model: ModelSpec, hardware: HardwareSpec, workload: WorkloadSpec, pins: Pins = Pins()) -> Plan:
    """Plan one job; raises :class:`ConfigError` with every problem found."""
    p = Problems()
    if not _check_inputs(model, hardware, workload, pins, p):
        p.raise_if_any()  # the arithmetic below needs positive sizes; other problems are collected on

    w, hw = workload, hardware
    settings: list[Setting] = []
    notes: list[str] = []
    rollout_gpus, train_gpus = _placement(hw, w, p)
    max_model_len = w.max_seq_len
    mnbt = max(max_model_len, MIN_BATCHED_TOKENS)
    util, util_reason = _utilization(model, hw, w, pins, train_gpus, notes)

    # --- trainer: Ulysses SP and batch normalization --------------------------------------------------
    budget = train_token_budget(model, hw, train_gpus, offload=w.offload)
    sp, sp_reason = _choose_sp(model, hw, w, pins, train_gpus, budget, notes)
    check_divisibility(w, train_gpus, sp, p)

    # --- engines: TP and the KV cache -----------------------------------------------------------------
    preset_cap = per_engine_preset(max_model_len)
    tp, kv, tp_reason = _choose_tp(model, hw, w, pins, rollout_gpus, util, mnbt, preset_cap, p)  # raises with every problem if nothing fits
    p.raise_if_any()

    engines = rollout_gpus // tp
    kv_cap = kv.seqs // 8 * 8 if kv.seqs >= 8 else kv.seqs
    if pins.max_num_seqs is not None:
        per_engine, cap_reason = pins.max_num_seqs, "pinned (pin.max_num_seqs)"
    elif kv_cap < preset_cap:
        per_engine = kv_cap
        cap_reason = (f"KV estimate: {kv.tokens:,} tokens per engine hold {kv.seqs} sequences of {max_model_len} "
                      f"tokens (no preemption even if every response runs to the limit); below Xtuner's "
                      f"{preset_cap} for this context length")
    else:
        per_engine = preset_cap
        cap_reason = (f"Xtuner preset for max_model_len {max_model_len} (≤4K:1024, ≤16K:512, ≤32K:128, else 64); "
                      f"the KV cache holds {kv.seqs} full-length sequences")
    ratio = pins.over_concurrency_ratio
    max_concurrent = max(1, int(per_engine * engines / w.n * ratio))
    ray = max(RAY_DEFAULT_MAX_CONCURRENCY, per_engine * engines)
    http = math.ceil(per_engine * ratio)

    prefix = w.n > 1
    engine = EnginePlan(tensor_parallel_size=tp, engines=engines, gpu_memory_utilization=util,
                        max_model_len=max_model_len, max_num_batched_tokens=mnbt, max_num_seqs=per_engine,
                        enable_prefix_caching=prefix, disable_log_stats=False, dtype=model.dtype, kv=kv)
    conc = ConcurrencyPlan(per_engine=per_engine, over_concurrency_ratio=ratio, max_concurrent=max_concurrent,
                           ray_max_concurrency=ray, http_max_connections=http)

    critic_budget = critic_forward = None
    resident = 2 if w.adv_estimator == "gae" else 1  # a critic of the same size shares the GPUs
    if w.adv_estimator == "gae":
        critic_budget = train_token_budget(model, hw, train_gpus, offload=w.offload, with_lm_head=False,
                                           resident_models=2)
        critic_forward = forward_token_budget(model, hw, train_gpus, offload=w.offload, with_lm_head=False,
                                              resident_models=2)
        budget = train_token_budget(model, hw, train_gpus, offload=w.offload, resident_models=2)
    forward = forward_token_budget(model, hw, train_gpus, offload=w.offload, resident_models=resident)
    verl = verl_batch(w, world_size=train_gpus, sp=sp, token_budget=budget, critic_token_budget=critic_budget,
                      forward_token_budget=forward, critic_forward_token_budget=critic_forward)
    trl = _trl(w, train_gpus, budget, notes)

    gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    S = settings.append
    S(Setting("engine.tensor_parallel_size", tp, tp_reason))
    S(Setting("pool.engines", engines, f"{rollout_gpus} rollout GPUs ÷ TP {tp}"))
    S(Setting("engine.gpu_memory_utilization", util, util_reason))
    S(Setting("engine.max_model_len", max_model_len,
              f"prompt {w.max_prompt_length} + response {w.max_response_length}, not the model's "
              f"{model.max_position_embeddings}: the KV cache is sized for what the job generates"))
    S(Setting("engine.max_num_batched_tokens", mnbt,
              f"≥ max(max_model_len, 4096) so a whole prompt prefills in one step; {MIN_BATCHED_TOKENS} is "
              "NeMo Gym's value and veRL's '> 2048'"))
    S(Setting("engine.max_num_seqs", per_engine, "the engine's own scheduler cap = the pool's per-engine cap"))
    S(Setting("kv_cache", f"{gib(max(kv.kv_per_gpu, 0))}/GPU",
              f"{gib(kv.budget_per_gpu)} (memory × {util}) − weights {gib(kv.weights_per_gpu)} (÷ TP {tp}) − "
              f"reserve {gib(kv.reserve_per_gpu)} (CUDA graphs, activations for {mnbt} tokens, sampler); "
              f"{kv.bytes_per_token:,} B/token/GPU = 2 × {model.num_layers} layers × "
              f"{max(1, model.num_kv_heads // tp)} KV heads × {model.head_dim} × {model.dtype_bytes} B"))
    S(Setting("engine.enable_prefix_caching", prefix,
              f"the n={w.n} samples of a group share one prompt: its KV is computed once" if prefix else
              "n=1: no prompt is shared within a group (turn on if prompts share a long system prompt)"))
    S(Setting("engine.disable_log_stats", False, "keep vLLM's stats logging on: KV usage and preemptions show "
              "whether these numbers hold (veRL guide)"))
    S(Setting("pool.per_engine", per_engine, cap_reason))
    S(Setting("pool.over_concurrency_ratio", ratio, "Xtuner: keep each engine's queue non-empty"))
    S(Setting("pool.max_concurrent", max_concurrent,
              f"per_engine {per_engine} × engines {engines} ÷ n {w.n} × ratio {ratio} (groups in flight)"))
    S(Setting("RAY_MAX_CONCURRENCY (Xtuner only)", ray,
              f"≥ per_engine × engines = {per_engine * engines} (never below Ray's default "
              f"{RAY_DEFAULT_MAX_CONCURRENCY}); Xtuner reads it when it defines its rollout actors. verl 0.9 never "
              f"reads it (each server actor gets max(1000, max_num_seqs + 16) from verl itself), nor does TRL"))
    S(Setting("http_max_connections", http, f"per engine: per_engine {per_engine} × ratio {ratio}"))
    S(Setting("trainer.world_size", train_gpus,
              "colocated: rollout and training share every GPU" if w.placement == "colocated" else
              f"dedicated: {hw.world_size} GPUs − {rollout_gpus} for rollout"))
    S(Setting("actor.ulysses_sequence_parallel_size", sp, sp_reason))
    S(Setting("actor.ppo_mini_batch_size(per GPU)", verl.mini_batch_per_gpu,
              f"ppo_mini_batch_size {w.ppo_mini_batch_size} × n {w.n} ÷ (world {train_gpus} ÷ sp {sp})"))
    S(Setting("actor.ppo_micro_batch_size_per_gpu", verl.micro_batch_per_gpu,
              f"as large as fits (≤ the per-GPU mini-batch {verl.mini_batch_per_gpu}, dividing it): "
              f"~{budget:,} activation tokens fit per GPU next to the sharded training state"))
    S(Setting("log_prob_micro_batch_size_per_gpu", verl.log_prob_micro_batch_per_gpu,
              f"ref and rollout log-probs are forward-only: 2× the training micro-batch, at most what the "
              f"forward budget holds (~{verl.log_prob_token_budget:,} tokens ÷ {-(-w.max_seq_len // sp)} per "
              f"sequence)"))
    S(Setting("actor.use_dynamic_bsz", True, "pack micro-batches by tokens, not sequences (veRL guide)"))
    S(Setting("actor.ppo_max_token_len_per_gpu", verl.ppo_max_token_len_per_gpu,
              f"≥ 2 × (prompt + response) ÷ sp = {2 * -(-w.max_seq_len // sp)}; raised to what fits, "
              f"capped at 64K"))
    S(Setting("log_prob_max_token_len_per_gpu", verl.log_prob_max_token_len_per_gpu,
              f"forward-only, from the memory model: ~{verl.log_prob_token_budget:,} tokens of "
              f"{forward_bytes_per_token(model) / 1024**2:.2f} MiB each fit next to the sharded state and the "
              f"reference weights (not 2× the training budget, which already fills the GPU); capped at 64K"))
    if verl.critic_micro_batch_per_gpu is not None:
        S(Setting("critic.ppo_micro_batch_size_per_gpu", verl.critic_micro_batch_per_gpu,
                  "a scalar head instead of the vocabulary: the critic fits more per GPU than the actor"
                  + (" (already the whole per-GPU mini-batch)"
                     if verl.critic_micro_batch_per_gpu == verl.mini_batch_per_gpu else "")))
        S(Setting("critic.forward_micro_batch_size_per_gpu", verl.critic_forward_micro_batch_per_gpu,
                  "forward-only: 2× the critic's training micro-batch, at most what its forward budget holds"))
    S(Setting("model.enable_gradient_checkpointing", True, "trades recompute for a larger micro-batch"))
    S(Setting("fsdp_config.param_offload/optimizer_offload", w.offload,
              "workload.offload" + (": frees GPU memory for the KV cache" if w.offload else "")))
    if trl is not None:
        S(Setting("trl.per_device_train_batch_size", trl.per_device_train_batch_size,
                  "completions per GPU per micro-step (the training micro-batch)"))
        S(Setting("trl.gradient_accumulation_steps", trl.gradient_accumulation_steps,
                  f"one optimizer step = ppo_mini_batch_size × n = {w.ppo_mini_batch_size * w.n} completions"))
        S(Setting("trl.generation_batch_size", trl.generation_batch_size,
                  f"per_device {trl.per_device_train_batch_size} × world {train_gpus} × steps_per_generation "
                  f"{trl.steps_per_generation}; divisible by num_generations {w.n}"))
    for note in notes:
        log.info("plan note: %s", note)
    return Plan(model=model, hardware=hw, workload=w, pins=pins, rollout_gpus=rollout_gpus, train_gpus=train_gpus,
                engine=engine, concurrency=conc, verl=verl, trl=trl, settings=tuple(settings), notes=tuple(notes))


def _check_inputs(model: ModelSpec, hw: HardwareSpec, w: WorkloadSpec, pins: Pins, p: Problems) -> bool:
    """Adds every problem found in the inputs alone; returns whether the sizes are positive."""
    for key, value in (("workload.max_prompt_length", w.max_prompt_length),
                       ("workload.max_response_length", w.max_response_length), ("workload.n", w.n),
                       ("workload.train_batch_size", w.train_batch_size),
                       ("workload.ppo_mini_batch_size", w.ppo_mini_batch_size),
                       ("hardware.gpus_per_node", hw.gpus_per_node), ("hardware.nodes", hw.nodes)):
        p.at_least(key, value, 1)
    if hw.gpu_memory_gib <= 0:
        p.add("hardware.gpu_memory_gib", hw.gpu_memory_gib, "must be > 0", 80)
    sizes_ok = not p.items
    p.in_range("pin.gpu_memory_utilization", pins.gpu_memory_utilization, 0.0, 1.0, low_open=True)
    p.at_least("pin.over_concurrency_ratio", pins.over_concurrency_ratio, 1.0)
    p.at_least("pin.max_num_seqs", pins.max_num_seqs, 1)
    if pins.max_num_seqs is not None and pins.max_num_seqs < w.n:
        p.add("pin.max_num_seqs", pins.max_num_seqs, f"a group of n={w.n} goes to one engine and must fit its cap",
              w.n)
    ctx = model.max_position_embeddings
    if w.max_response_length >= ctx:
        p.add("workload.max_response_length", w.max_response_length,
              f"leaves no room for a prompt in {model.name}'s context of {ctx} tokens", ctx - w.max_prompt_length
              if w.max_prompt_length < ctx else ctx // 2)
    elif w.max_seq_len > ctx:
        p.add("workload.max_prompt_length", w.max_prompt_length,
              f"prompt + response ({w.max_seq_len}) exceeds {model.name}'s context of {ctx} tokens",
              ctx - w.max_response_length)
    if hw.gpus_per_node >= 1 and hw.nodes >= 1:
        tps = _tp_candidates(model, hw.gpus_per_node, hw.world_size)
        if pins.tensor_parallel_size is not None and pins.tensor_parallel_size not in tps:
            p.add("pin.tensor_parallel_size", pins.tensor_parallel_size,
                  f"must divide hardware.gpus_per_node ({hw.gpus_per_node}) and {model.name}'s "
                  f"{model.num_heads} attention heads", _nearest_of(pins.tensor_parallel_size, tps))
        sps = _sp_candidates(model, hw.gpus_per_node, hw.world_size)
        if pins.ulysses_sp is not None and pins.ulysses_sp not in sps:
            p.add("pin.ulysses_sp", pins.ulysses_sp,
                  f"must divide the GPUs of a node ({hw.gpus_per_node}) and {model.name}'s attention heads",
                  _nearest_of(pins.ulysses_sp, sps))
        if w.placement == "dedicated" and w.rollout_gpus is not None:
            if not 1 <= w.rollout_gpus < hw.world_size:
                p.add("workload.rollout_gpus", w.rollout_gpus,
                      f"dedicated placement needs GPUs left to train on (of {hw.world_size})",
                      max(1, hw.world_size // 2))
    return sizes_ok


def _placement(hw: HardwareSpec, w: WorkloadSpec, p: Problems) -> tuple[int, int]:
    """(rollout GPUs, training GPUs). On a problem it reports it and plans as colocated, so the checks
    that follow still run and everything is reported together."""
    colocated = hw.world_size, hw.world_size
    if w.placement == "colocated":
        return colocated
    if hw.world_size < 2:
        p.add("workload.placement", w.placement, f"needs at least 2 GPUs (hardware has {hw.world_size})",
              "colocated")
        return colocated
    rollout = w.rollout_gpus if w.rollout_gpus is not None else hw.world_size // 2
    train = hw.world_size - rollout
    if not 1 <= rollout < hw.world_size:
        return colocated  # reported by _check_inputs
    if train % hw.gpus_per_node and hw.nodes > 1:
        # verl's trainer.nnodes × n_gpus_per_node must describe the training GPUs.
        p.add("workload.rollout_gpus", rollout, "must leave whole nodes for training on a multi-node cluster",
              hw.gpus_per_node * max(1, rollout // hw.gpus_per_node))
        return colocated
    return rollout, train


def _utilization(model: ModelSpec, hw: HardwareSpec, w: WorkloadSpec, pins: Pins, train_gpus: int,
                 notes: list[str]) -> tuple[float, str]:
    if pins.gpu_memory_utilization is not None and 0 < pins.gpu_memory_utilization <= 1:
        return pins.gpu_memory_utilization, "pinned (pin.gpu_memory_utilization)"
    if w.placement == "dedicated":
        return UTIL_DEDICATED, ("dedicated engines: nothing else on the GPU (NeMo Gym: up to 0.95; 0.9 leaves "
                                "room for fragmentation)")
    return colocated_utilization(model, hw, train_gpus, offload=w.offload, notes=notes)


def colocated_utilization(model: ModelSpec, hw: HardwareSpec, train_gpus: int, *, offload: bool,
                          notes: Optional[list[str]] = None, update_bytes: int = 0) -> tuple[float, str]:
    """The share of each GPU an engine may take next to a trainer on the same GPUs, and why.

    Also what the pool launches colocated engines with when ``engine.gpu_memory_utilization`` is unset.
    ``update_bytes``: what a weight update takes outside vLLM's budget (:func:`.memory.nccl_update_bytes`).
    """
    if offload:
        util = UTIL_COLOCATED_OFFLOAD
        if update_bytes:
            util = max(UTIL_COLOCATED_RANGE[0], utilization_leaving(hw.gpu_memory_gib, util, update_bytes))
        return util, ("colocated with parameter/optimizer offload: the trainer's state is on the CPU during rollout"
                      + (f"; {update_bytes / GIB:.1f} GiB kept for the weight update" if update_bytes else ""))
    # Without offload the sharded fp32 parameters and Adam moments stay on the GPU during rollout.
    resident = 12 * model.num_params / max(1, train_gpus) + 4 * GIB + update_bytes
    free = math.floor((1 - resident / (hw.gpu_memory_gib * GIB)) * 20) / 20
    low, high = UTIL_COLOCATED_RANGE
    util = round(min(high, max(low, free)), 2)
    if free < low and notes is not None:
        notes.append(f"colocated without offload: the training state (~{resident / GIB:.0f} GiB/GPU) leaves only "
                     f"{max(free, 0):.2f} of GPU memory for vLLM; set workload.offload=true or use more GPUs")
    return util, (f"colocated without offload: veRL's 0.5–0.7; the sharded training state keeps "
                  f"~{resident / GIB:.1f} GiB/GPU resident during rollout")


def dedicated_utilization(hw: HardwareSpec, update_bytes: int = 0) -> tuple[float, str]:
    """An engine alone on its GPUs: :data:`UTIL_DEDICATED`, lowered so a weight update's memory outside vLLM's
    budget (``update_bytes``: NCCL receive buffers, layer-wise reload) still fits beside it."""
    if not update_bytes:
        return UTIL_DEDICATED, "dedicated engines: nothing else on the GPU"
    util = utilization_leaving(hw.gpu_memory_gib, UTIL_DEDICATED, update_bytes)
    return util, (f"dedicated engines, {update_bytes / GIB:.1f} GiB of each GPU kept outside vLLM's budget for the "
                  f"NCCL weight update (receive buffers and layer-wise reload)")


def _tp_candidates(model: ModelSpec, gpus_per_node: int, gpus: int) -> list[int]:
    # vLLM splits attention heads evenly; TP stays inside a node (NVLink).
    return [t for t in range(1, gpus_per_node + 1)
            if gpus_per_node % t == 0 and model.num_heads % t == 0 and gpus % t == 0]


def _sp_candidates(model: ModelSpec, gpus_per_node: int, gpus: int) -> list[int]:
    kv = model.num_kv_heads
    return [s for s in _tp_candidates(model, gpus_per_node, gpus) if kv % s == 0 or s % kv == 0]


def _choose_tp(model: ModelSpec, hw: HardwareSpec, w: WorkloadSpec, pins: Pins, rollout_gpus: int, util: float,
               mnbt: int, cap: int, p: Problems) -> tuple[int, KVEstimate, str]:
    candidates = _tp_candidates(model, hw.gpus_per_node, rollout_gpus)
    pinned = pins.tensor_parallel_size in candidates  # an invalid pin was reported; plan as if unset
    if pinned:
        candidates = [pins.tensor_parallel_size]  # type: ignore[list-item]

    def est(t: int) -> KVEstimate:
        return kv_estimate(model, hw, tp=t, utilization=util, max_model_len=w.max_seq_len,
                           max_num_batched_tokens=mnbt, max_num_seqs=cap)

    useful = max(w.n, USEFUL_BATCH)
    estimates = [est(t) for t in candidates]
    chosen = next((e for e in estimates if e.seqs >= useful), None)
    why = f"the smallest TP whose KV cache holds a useful batch (≥ {useful} full-length sequences)"
    if chosen is None:
        chosen = next((e for e in reversed(estimates) if e.seqs >= w.n), None)
        why = f"the KV cache holds fewer than {useful} full-length sequences at any TP: the largest TP that fits"
    if pinned:
        why = "pinned (pin.tensor_parallel_size)"
    if chosen is None:
        last = estimates[-1]
        if not last.fits:
            fits_on = [name for name, h in HARDWARE_PRESETS.items() if h.kind == hw.kind and h.gpu_memory_gib >
                       hw.gpu_memory_gib and kv_estimate(model, h, tp=max(_tp_candidates(model, h.gpus_per_node,
                                                         h.gpus_per_node)), utilization=util,
                                                         max_model_len=w.max_seq_len, max_num_batched_tokens=mnbt,
                                                         max_num_seqs=cap).seqs >= w.n]
            hint = f"hardware={fits_on[0]}" if fits_on else "a larger GPU"
            if w.placement == "colocated" and pins.gpu_memory_utilization is None:
                hint += " or workload.placement=dedicated"
            # The fix is another key (hardware, placement), so the suggestion is written out whole.
            p.items.append(ConfigProblem(
                "model", model.name,
                f"does not fit even at TP={last.tp}: weights {last.weights_per_gpu / GIB:.1f} GiB/GPU + reserve "
                f"{last.reserve_per_gpu / GIB:.1f} GiB exceed {hw.gpu_memory_gib} GiB × {util}", hint))
        else:
            p.add("workload.max_response_length", w.max_response_length,
                  f"at TP={last.tp} the KV cache holds {last.seqs} sequences of {w.max_seq_len} tokens, fewer than "
                  f"one group (n={w.n})", max(1, w.max_response_length // 2))
        raise ConfigError(p.items)
    return chosen.tp, chosen, why + _trade(chosen, estimates, rollout_gpus)


def _trade(chosen: KVEstimate, estimates: list[KVEstimate], gpus: int) -> str:
    """What the next larger TP would buy and cost: more KV per engine, fewer replicas."""
    bigger = [e for e in estimates if e.tp > chosen.tp and e.fits]
    if not bigger:
        return ""
    nxt = bigger[0]
    have, alt = gpus // chosen.tp * chosen.seqs, gpus // nxt.tp * nxt.seqs
    gain = f"{(alt - have) / have:+.0%}" if have else "more"
    return (f"; TP={nxt.tp} would give {gpus // nxt.tp} engines × {nxt.seqs} = {alt} sequences in flight "
            f"(vs {gpus // chosen.tp} × {chosen.seqs} = {have}, {gain} KV from storing the weights fewer times) "
            f"but fewer replicas and an all-reduce per layer: more replicas decode faster (veRL guide)")


def _choose_sp(model: ModelSpec, hw: HardwareSpec, w: WorkloadSpec, pins: Pins, train_gpus: int, budget: int,
               notes: list[str]) -> tuple[int, str]:
    candidates = _sp_candidates(model, hw.gpus_per_node, train_gpus)
    if pins.ulysses_sp in candidates:  # an invalid pin was reported; plan as if unset
        return pins.ulysses_sp, "pinned (pin.ulysses_sp)"  # type: ignore[return-value]
    need = 2 * w.max_seq_len
    for sp in candidates:
        if -(-need // sp) <= budget:
            if sp == 1:
                return 1, f"a 2 × {w.max_seq_len}-token micro-batch fits one GPU (~{budget:,} tokens free)"
            return sp, (f"long for {model.name}: 2 × {w.max_seq_len} tokens of activations "
                        f"({need * train_bytes_per_token(model) / GIB:.0f} GiB) exceed the "
                        f"~{budget:,} tokens one GPU holds; Ulysses SP={sp} splits each sequence over {sp} GPUs")
    state = train_state_bytes_per_gpu(model, train_gpus, offload=w.offload) / GIB
    notes.append(f"training may run out of memory: 2 × {w.max_seq_len} tokens per GPU do not fit even with Ulysses "
                 f"SP={candidates[-1]} (sharded state ~{state:.0f} GiB/GPU); set workload.offload=true, use more "
                 f"GPUs or shorter sequences")
    return candidates[-1], "largest SP the heads and GPUs allow; still tight (see notes)"


def _trl(w: WorkloadSpec, train_gpus: int, budget: int, notes: list[str]) -> Optional[TrlBatch]:
    if w.n < 2:
        notes.append("TRL's GRPO needs num_generations ≥ 2: no TRL settings for n=1")
        return None
    if (w.ppo_mini_batch_size * w.n) % train_gpus:
        notes.append(f"TRL has no sequence parallelism: ppo_mini_batch_size × n must divide over all "
                     f"{train_gpus} GPUs; no TRL settings")
        return None
    return trl_batch(w, world_size=train_gpus, token_budget=budget)


def _nearest_of(value: int, candidates: list[int]) -> int:
    return min(candidates, key=lambda c: (abs(c - value), c)) if candidates else 1
