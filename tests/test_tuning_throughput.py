"""The planner's forward-only (log-prob) memory budget, its rollout throughput model, and whose environment
RAY_MAX_CONCURRENCY is advice for."""

from __future__ import annotations

import dataclasses

import pytest

from rollout_plugin.sim.profile import load_profile
from rollout_plugin.tuning import HARDWARE_PRESETS, MODEL_PRESETS, WorkloadSpec, make_plan, pool_config, pool_yaml
from rollout_plugin.tuning.emit import verl_command, verl_overrides
from rollout_plugin.tuning.memory import (
    TRAIN_MARGIN,
    forward_bytes_per_token,
    forward_token_budget,
    train_bytes_per_token,
)
from rollout_plugin.tuning.throughput import decode_step_s, rollout_estimate

Q7, H100 = MODEL_PRESETS["qwen2.5-7b"], HARDWARE_PRESETS["h100-80"]


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_a_forward_token_is_cheaper_than_a_training_token(name):
    m = MODEL_PRESETS[name]
    assert 0 < forward_bytes_per_token(m) < train_bytes_per_token(m)
    assert forward_bytes_per_token(m, with_lm_head=False) < forward_bytes_per_token(m)


def test_the_forward_budget_counts_the_reference_weights():
    with_ref = forward_token_budget(Q7, H100, 8, offload=False)
    bare = (H100.gpu_memory_gib * 2**30 - TRAIN_MARGIN - 16 * Q7.num_params // 8) // forward_bytes_per_token(Q7)
    assert with_ref < bare  # the reference policy's sharded weights are resident too
    assert forward_token_budget(Q7, H100, 8, offload=True) > with_ref


def test_log_prob_budgets_come_from_the_memory_model_not_twice_the_training_budget():
    """The old rule (2× a training budget already sized to fill the GPU) asks for more than fits."""
    plan = make_plan(Q7, H100, WorkloadSpec(max_prompt_length=1024, max_response_length=4096))
    v = plan.verl
    assert 2 * v.ppo_max_token_len_per_gpu > v.log_prob_token_budget  # doubling would not fit
    assert v.log_prob_max_token_len_per_gpu <= v.log_prob_token_budget
    assert v.log_prob_micro_batch_per_gpu * 5120 <= v.log_prob_token_budget
    assert v.log_prob_micro_batch_per_gpu < 2 * v.micro_batch_per_gpu
    rows = {s.key: s for s in plan.settings}
    assert "memory model" in rows["log_prob_max_token_len_per_gpu"].reason
    overrides = dict(o.split("=", 1) for o in verl_overrides(plan))
    assert overrides["actor_rollout_ref.ref.log_prob_max_token_len_per_gpu"] == str(v.log_prob_max_token_len_per_gpu)


def test_the_gae_critic_forward_budget_is_its_own():
    plan = make_plan(MODEL_PRESETS["qwen2.5-0.5b"], H100, WorkloadSpec(adv_estimator="gae"))
    v = plan.verl
    assert v.critic_forward_max_token_len_per_gpu is not None
    assert v.critic_micro_batch_per_gpu <= v.critic_forward_micro_batch_per_gpu <= 2 * v.critic_micro_batch_per_gpu


def test_decode_step_matches_the_simulators_h100_profile():
    """Same roofline as the sim's h100_llama8b profile (anchored to published TPOT): within 10 %."""
    profile = load_profile("h100_llama8b")
    llama = MODEL_PRESETS["llama-3.1-8b"]
    for running, context in ((1, 300), (64, 1000), (256, 600)):
        ours = decode_step_s(llama, H100, tp=1, running=running, context=context)
        theirs = profile.step.seconds(running, running * context, 0.0)
        assert ours == pytest.approx(theirs, rel=0.10), (running, context)


def test_rollout_estimate_waits_only_beyond_what_the_servers_admit():
    kw = dict(engines=8, tp=1, running=256, prompt_tokens=1024, response_tokens=4096)
    few = rollout_estimate(Q7, H100, samples=1000, admitted=2048, **kw)
    assert few.wait_s == 0 and few.rollout_s > 0
    many = rollout_estimate(Q7, H100, samples=8192, admitted=2048, **kw)
    assert many.wait_s == pytest.approx((8192 - 2048) / many.samples_per_s)
    assert many.rollout_s == pytest.approx(8192 / many.samples_per_s)
    longer = rollout_estimate(Q7, H100, samples=8192, admitted=2048, **{**kw, "response_tokens": 8192})
    assert longer.wait_s > 2 * many.wait_s  # twice the tokens, and each step reads more KV
    unknown = dataclasses.replace(H100, memory_bandwidth_gbs=None)
    assert rollout_estimate(Q7, unknown, samples=8192, admitted=2048, **kw) is None


def test_ray_max_concurrency_is_advice_for_xtuner_only():
    plan = make_plan(Q7, H100, WorkloadSpec())
    assert "RAY_MAX_CONCURRENCY" not in verl_command(plan)  # verl 0.9 never reads it
    engine, _ = pool_config(plan)
    assert "RAY_MAX_CONCURRENCY" not in engine.env and "RAY_MAX_CONCURRENCY" not in pool_yaml(plan)
    (row,) = [s for s in plan.settings if "RAY_MAX_CONCURRENCY" in s.key]
    assert row.key == "RAY_MAX_CONCURRENCY (Xtuner only)" and "verl 0.9 never reads it" in row.reason
