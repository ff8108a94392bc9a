"""The tuning planner's arithmetic and rules, one decision at a time (pure: no engines, no files but tmp)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from rollout_plugin.config.validate import Problems, check_engine, check_pool
from rollout_plugin.errors import ConfigError
from rollout_plugin.tuning import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    Pins,
    WorkloadSpec,
    kv_bytes_per_token,
    kv_estimate,
    load_hf_config,
    make_plan,
    model_from_hf_config,
    per_engine_preset,
    pool_config,
    trl_kwargs,
    verl_overrides,
    vllm_args,
)
from rollout_plugin.tuning.memory import forward_token_budget
from rollout_plugin.tuning.spec import GIB, estimate_params

Q7 = MODEL_PRESETS["qwen2.5-7b"]
H100 = HARDWARE_PRESETS["h100-80"]


def test_kv_estimate_matches_a_hand_computation_for_qwen25_7b():
    # 2 (K,V) × 28 layers × 4 KV heads × 128 head dim × 2 bytes (bf16)
    assert kv_bytes_per_token(Q7) == 2 * 28 * 4 * 128 * 2 == 57_344
    est = kv_estimate(Q7, H100, tp=1, utilization=0.7, max_model_len=2048, max_num_batched_tokens=8192,
                      max_num_seqs=1024)
    assert est.budget_per_gpu == 59_828_894_433  # int(79.6 GiB × 0.7)
    assert est.weights_per_gpu == 15_232_000_000  # 7.616e9 params × 2 bytes
    # 2 GiB fixed + 8192 tokens × (2 × 18944 + 4 × 3584) × 2 B + 1024 seqs × 152064 vocab × 4 B
    assert est.reserve_per_gpu == 3_625_975_808
    assert est.kv_per_gpu == 59_828_894_433 - 15_232_000_000 - 3_625_975_808 == 40_970_918_625
    assert est.tokens == 40_970_918_625 // 57_344 == 714_476
    assert est.seqs == 714_476 // 2048 == 348


def test_kv_heads_split_by_tp_but_never_below_one_head():
    assert kv_bytes_per_token(Q7, tp=2) == kv_bytes_per_token(Q7) // 2
    assert kv_bytes_per_token(Q7, tp=4) == 2 * 28 * 1 * 128 * 2
    # TP beyond the KV head count replicates heads: one head per GPU, not a fraction.
    m = dataclasses.replace(Q7, num_kv_heads=2)
    assert kv_bytes_per_token(m, tp=4) == 2 * 28 * 1 * 128 * 2


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset_parameter_counts_agree_with_their_shapes(name):
    m = MODEL_PRESETS[name]
    est = estimate_params(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                          num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, intermediate_size=m.intermediate_size,
                          vocab_size=m.vocab_size, tie_word_embeddings=m.tie_word_embeddings,
                          qkv_bias=name.startswith("qwen2"))
    assert abs(est - m.num_params) / m.num_params < 0.01


def test_hf_config_json_round_trip(tmp_path):
    cfg = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_hf_config(str(tmp_path))
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.path) == (28, 4, 128, "bfloat16", str(tmp_path))
    assert abs(m.num_params - Q7.num_params) / Q7.num_params < 0.001
    assert kv_bytes_per_token(m) == kv_bytes_per_token(Q7)


def test_hf_config_missing_fields_are_reported_together():
    with pytest.raises(ConfigError) as err:
        model_from_hf_config({"vocab_size": 10, "torch_dtype": "int3"}, name="x")
    keys = [p.key for p in err.value.problems]
    assert keys == ["model.path:num_hidden_layers", "model.path:hidden_size", "model.path:num_attention_heads",
                    "model.dtype"]


def test_missing_config_json_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path=.*no config.json"):
        load_hf_config(str(tmp_path / "nope"))


@pytest.mark.parametrize(("max_model_len", "cap"), [(2048, 1024), (4096, 1024), (4097, 512), (16384, 512),
                                                    (32768, 128), (32769, 64)])
def test_xtuner_per_engine_presets(max_model_len, cap):
    assert per_engine_preset(max_model_len) == cap


def test_utilization_follows_placement_and_offload():
    colo = make_plan(Q7, H100, WorkloadSpec())
    off = make_plan(Q7, H100, WorkloadSpec(offload=True))
    ded = make_plan(Q7, H100, WorkloadSpec(placement="dedicated", rollout_gpus=4))
    assert 0.5 <= colo.engine.gpu_memory_utilization <= 0.7
    assert colo.engine.gpu_memory_utilization < off.engine.gpu_memory_utilization < ded.engine.gpu_memory_utilization
    assert ded.engine.gpu_memory_utilization <= 0.95
    assert (ded.rollout_gpus, ded.train_gpus, ded.engine.engines) == (4, 4, 4)


def test_prefers_replicas_and_says_what_larger_tp_would_cost():
    plan = make_plan(Q7, H100, WorkloadSpec())
    assert plan.engine.tensor_parallel_size == 1 and plan.engine.engines == 8
    reason = next(s.reason for s in plan.settings if s.key == "engine.tensor_parallel_size")
    assert "TP=2 would give 4 engines" in reason and "fewer replicas" in reason


def test_large_model_needs_tp_and_small_gpus_need_more():
    big = make_plan(MODEL_PRESETS["llama-3.1-70b"], H100, WorkloadSpec())
    assert big.engine.tensor_parallel_size >= 4
    assert big.engine.kv.weights_per_gpu * big.engine.tensor_parallel_size >= 70e9 * 2


def test_per_engine_capped_by_kv_when_the_preset_is_too_many():
    plan = make_plan(Q7, H100, WorkloadSpec(max_prompt_length=1024, max_response_length=1024))
    assert plan.concurrency.per_engine == plan.engine.kv.seqs // 8 * 8 < 1024
    small = make_plan(MODEL_PRESETS["qwen2.5-0.5b"], HARDWARE_PRESETS["h200-141"], WorkloadSpec())
    assert small.concurrency.per_engine == 1024  # the Xtuner preset: the KV cache holds more


def test_concurrency_formulas():
    plan = make_plan(Q7, H100, WorkloadSpec(n=16, train_batch_size=128, ppo_mini_batch_size=32))
    c, e = plan.concurrency, plan.engine
    assert c.max_concurrent == int(c.per_engine * e.engines / 16 * 1.2)
    assert c.ray_max_concurrency >= c.per_engine * e.engines
    assert c.http_max_connections == -(-c.per_engine * 12 // 10)
    assert e.max_num_seqs == c.per_engine


def test_prefix_caching_only_when_samples_share_a_prompt():
    assert make_plan(Q7, H100, WorkloadSpec(n=8)).engine.enable_prefix_caching
    one = make_plan(Q7, H100, WorkloadSpec(n=1))
    assert not one.engine.enable_prefix_caching
    assert one.trl is None and any("num_generations" in n for n in one.notes)


def test_verl_normalization_and_micro_batches():
    plan = make_plan(Q7, H100, WorkloadSpec(n=8, train_batch_size=256, ppo_mini_batch_size=64))
    v = plan.verl
    assert v.mini_batch_per_gpu == 64 * 8 // 8
    assert v.mini_batch_per_gpu % v.micro_batch_per_gpu == 0
    assert v.ppo_max_token_len_per_gpu >= 2 * 2048
    # Forward-only log-probs: sized by the memory model's forward budget, not 2× the training values.
    fwd = forward_token_budget(Q7, H100, 8, offload=False)
    assert v.log_prob_token_budget == fwd
    assert v.log_prob_micro_batch_per_gpu == min(2 * v.micro_batch_per_gpu, fwd // 2048)
    assert v.log_prob_max_token_len_per_gpu == min(65536, fwd) // 1024 * 1024


def test_critic_gets_a_larger_micro_batch_than_the_actor():
    # Qwen 0.5B: the 152K-vocabulary logits dominate the actor's activations; the critic has a scalar head.
    plan = make_plan(MODEL_PRESETS["qwen2.5-0.5b"], H100,
                     WorkloadSpec(adv_estimator="gae", max_prompt_length=2048, max_response_length=6144,
                                  train_batch_size=512, ppo_mini_batch_size=256))
    v = plan.verl
    assert v.critic_micro_batch_per_gpu > v.micro_batch_per_gpu
    assert v.critic_forward_micro_batch_per_gpu == 2 * v.critic_micro_batch_per_gpu
    assert any(o.startswith("critic.ppo_micro_batch_size_per_gpu=") for o in verl_overrides(plan))


def test_ulysses_suggested_only_for_long_sequences():
    short = make_plan(Q7, H100, WorkloadSpec(max_prompt_length=1024, max_response_length=1024))
    long = make_plan(Q7, H100, WorkloadSpec(max_prompt_length=2048, max_response_length=30000, n=8,
                                            train_batch_size=64, ppo_mini_batch_size=32))
    assert short.verl.ulysses_sp == 1
    assert long.verl.ulysses_sp > 1
    assert long.verl.ppo_max_token_len_per_gpu * long.verl.ulysses_sp >= 2 * 32048


def test_trl_generation_batch_identity():
    plan = make_plan(Q7, H100, WorkloadSpec(n=8, train_batch_size=256, ppo_mini_batch_size=64))
    t = plan.trl
    assert t.generation_batch_size == t.per_device_train_batch_size * 8 * t.steps_per_generation == 256 * 8
    assert t.generation_batch_size % t.num_generations == 0
    assert t.per_device_train_batch_size * 8 * t.gradient_accumulation_steps == 64 * 8
    kw = trl_kwargs(plan)
    assert kw["vllm_mode"] == "colocate" and kw["num_generations"] == 8


def test_pins_win():
    plan = make_plan(Q7, H100, WorkloadSpec(), Pins(gpu_memory_utilization=0.55, tensor_parallel_size=2,
                                                   max_num_seqs=64, ulysses_sp=2))
    assert (plan.engine.gpu_memory_utilization, plan.engine.tensor_parallel_size, plan.concurrency.per_engine,
            plan.verl.ulysses_sp) == (0.55, 2, 64, 2)


def test_inconsistent_input_reports_every_problem_with_nearest_values():
    bad = WorkloadSpec(n=3, train_batch_size=100, ppo_mini_batch_size=30, max_response_length=40000)
    with pytest.raises(ConfigError) as err:
        make_plan(Q7, H100, bad, Pins(gpu_memory_utilization=1.5, tensor_parallel_size=3))
    found = [(p.key, p.suggestion) for p in err.value.problems]
    assert found[:3] == [
        ("pin.gpu_memory_utilization", "pin.gpu_memory_utilization=1.0"),
        ("workload.max_response_length", "workload.max_response_length=31744"),  # 32768 context − 1024 prompt
        ("pin.tensor_parallel_size", "pin.tensor_parallel_size=2"),
    ]
    msgs = [str(p) for p in err.value.problems[3:]]
    assert len(msgs) == 2
    assert "must divide workload.train_batch_size (100)" in msgs[0] and "ppo_mini_batch_size=25" in msgs[0]
    assert "do not divide over 8 training GPUs" in msgs[1] and "train_batch_size=96 or 104" in msgs[1]
    assert str(err.value).count("; ") == len(err.value.problems) - 1  # one message, every problem in it


def test_mini_batch_must_split_over_data_parallel_ranks():
    with pytest.raises(ConfigError) as err:
        make_plan(Q7, H100, WorkloadSpec(n=3, train_batch_size=120, ppo_mini_batch_size=30))
    (problem,) = err.value.problems
    assert "do not divide over 8 data-parallel ranks" in str(problem)
    assert problem.suggestion == "workload.ppo_mini_batch_size=24 or 32"


def test_mini_batch_above_train_batch():
    with pytest.raises(ConfigError, match=r"workload.ppo_mini_batch_size=512: exceeds .*\(try "
                                          r"workload.ppo_mini_batch_size=256\)"):
        make_plan(Q7, H100, WorkloadSpec(ppo_mini_batch_size=512))


def test_model_that_does_not_fit_a_node_names_a_hardware_that_does():
    with pytest.raises(ConfigError) as err:
        make_plan(MODEL_PRESETS["llama-3.1-70b"], HARDWARE_PRESETS["l40s-48"], WorkloadSpec(),
                  Pins(gpu_memory_utilization=0.3))
    (problem,) = err.value.problems
    assert problem.key == "model" and "does not fit even at TP=8" in problem.reason
    assert problem.suggestion and problem.suggestion.startswith("hardware=")


def test_emitted_pool_config_passes_the_pools_own_validators():
    plan = make_plan(Q7, H100, WorkloadSpec(n=8))
    engine, pool = pool_config(plan)
    p = Problems()
    check_engine(engine, p)
    check_pool(pool, p)
    assert p.items == []
    assert (pool.engines, pool.k, pool.per_engine, pool.max_concurrent) == (
        plan.engine.engines, 8, plan.concurrency.per_engine, plan.concurrency.max_concurrent)
    args = vllm_args(plan)
    assert args[args.index("--max-num-seqs") + 1] == str(plan.engine.max_num_seqs)
    assert "--disable-log-stats" not in args


def test_planner_imports_without_torch_or_trainers():
    code = ("import sys, rollout_plugin.tuning, rollout_plugin.cli.plan; "
            "bad = [m for m in ('torch', 'vllm', 'verl', 'trl', 'transformers') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_gib_constant():
    assert GIB == 1 << 30
