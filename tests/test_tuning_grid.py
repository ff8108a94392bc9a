"""Every model × hardware preset × n × lengths × placement: each plan keeps the rules, or fails with
problems that name a key and a nearest valid value."""

from __future__ import annotations

import itertools

import pytest

from rollout_plugin.config.validate import Problems, check_engine, check_pool
from rollout_plugin.errors import ConfigError
from rollout_plugin.tuning import HARDWARE_PRESETS, MODEL_PRESETS, WorkloadSpec, make_plan, per_engine_preset, pool_config

NS = (4, 8, 16)
LENGTHS = ((512, 512), (1024, 3072), (2048, 14336))
PLACEMENTS = (("colocated", False), ("colocated", True), ("dedicated", False))
GRID = list(itertools.product(sorted(MODEL_PRESETS), sorted(HARDWARE_PRESETS), NS, LENGTHS, PLACEMENTS))
# Problems the grid is allowed to hit: models too large for the device, groups too long for its KV cache,
# and a one-device CPU box asked to split rollout from training.
EXPECTED_FAILURE_KEYS = {"model", "workload.max_response_length", "workload.placement"}


def _plan(model, hardware, n, lengths, placement):
    (prompt, response), (where, offload) = lengths, placement
    w = WorkloadSpec(max_prompt_length=prompt, max_response_length=response, n=n, train_batch_size=256,
                     ppo_mini_batch_size=64, placement=where, offload=offload)
    return make_plan(MODEL_PRESETS[model], HARDWARE_PRESETS[hardware], w)


@pytest.mark.parametrize(("model", "hardware", "n", "lengths", "placement"), GRID,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_grid_invariants(model, hardware, n, lengths, placement):
    try:
        plan = _plan(model, hardware, n, lengths, placement)
    except ConfigError as err:
        for problem in err.problems:
            assert problem.key in EXPECTED_FAILURE_KEYS, problem
            assert problem.suggestion, problem  # always a nearest valid value to try
        if any(p.key == "model" for p in err.problems):
            # Plausibly too big: bf16 weights over a whole node's TP fill most of the smallest engine budget
            # (utilization ≥ 0.5, reserve < 8 GiB), so a 7B model is never refused this way.
            m, h = MODEL_PRESETS[model], HARDWARE_PRESETS[hardware]
            assert m.num_params * 2 / h.gpus_per_node > 0.5 * h.gpu_memory_gib * 2**30 - 8 * 2**30
        return

    m, h, w, e, c, v = plan.model, plan.hardware, plan.workload, plan.engine, plan.concurrency, plan.verl
    # Engine
    assert e.max_model_len == w.max_prompt_length + w.max_response_length <= m.max_position_embeddings
    assert e.max_num_batched_tokens >= max(e.max_model_len, 4096) > 2048
    assert 0 < e.gpu_memory_utilization <= 0.95
    if w.placement == "colocated" and not w.offload:
        assert 0.5 <= e.gpu_memory_utilization <= 0.7
    assert e.kv.fits and e.kv.seqs >= w.n
    assert h.gpus_per_node % e.tensor_parallel_size == 0 and m.num_heads % e.tensor_parallel_size == 0
    assert e.engines * e.tensor_parallel_size == plan.rollout_gpus
    assert e.enable_prefix_caching == (w.n > 1) and e.disable_log_stats is False
    # Concurrency (Xtuner)
    assert w.n <= c.per_engine <= min(per_engine_preset(e.max_model_len), e.kv.seqs)
    assert e.max_num_seqs == c.per_engine
    assert c.max_concurrent == max(1, int(c.per_engine * e.engines / w.n * c.over_concurrency_ratio))
    assert c.ray_max_concurrency >= c.per_engine * e.engines
    assert c.http_max_connections >= c.per_engine * c.over_concurrency_ratio
    # verl normalization
    assert v.mini_batch_per_gpu * (v.world_size // v.ulysses_sp) == w.ppo_mini_batch_size * w.n
    assert v.mini_batch_per_gpu % v.micro_batch_per_gpu == 0
    assert v.ppo_max_token_len_per_gpu * v.ulysses_sp >= 2 * e.max_model_len
    # Log-probs (forward-only) within the memory model's forward budget, beyond it only at the floors.
    seq = -(-e.max_model_len // v.ulysses_sp)
    assert 1 <= v.log_prob_micro_batch_per_gpu <= 2 * v.micro_batch_per_gpu
    assert v.log_prob_micro_batch_per_gpu == 1 or v.log_prob_micro_batch_per_gpu * seq <= v.log_prob_token_budget
    assert v.log_prob_max_token_len_per_gpu * v.ulysses_sp >= 2 * e.max_model_len
    assert v.log_prob_max_token_len_per_gpu <= max(v.log_prob_token_budget, 2 * seq)
    assert (w.train_batch_size * w.n) % v.world_size == 0
    # TRL
    t = plan.trl
    assert t is not None
    assert t.generation_batch_size == t.per_device_train_batch_size * t.world_size * t.steps_per_generation
    assert t.generation_batch_size % w.n == 0
    assert t.per_device_train_batch_size * t.world_size * t.gradient_accumulation_steps == w.ppo_mini_batch_size * w.n
    # The pool accepts what the planner emits.
    engine, pool = pool_config(plan)
    p = Problems()
    check_engine(engine, p)
    check_pool(pool, p)
    assert p.items == []
    assert all(s.reason for s in plan.settings)


def test_grid_is_mostly_feasible():
    """A planner that refuses everything would pass the invariants above; this one must not."""
    ok = 0
    for case in GRID:
        try:
            _plan(*case)
            ok += 1
        except ConfigError:
            pass
    assert ok >= 0.75 * len(GRID)
    # Every GPU preset plans the common case: a 7B model, n=8, 1K + 3K tokens, colocated.
    for hw in HARDWARE_PRESETS:
        if HARDWARE_PRESETS[hw].kind == "gpu":
            _plan("qwen2.5-7b", hw, 8, (1024, 3072), ("colocated", False))
