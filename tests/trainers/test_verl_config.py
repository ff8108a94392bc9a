"""Our rollout_pool groups on verl's own ppo_trainer config: composed, resolved, validated by verl.

Runs in the trainer venv (verl 0.9 + our package installed with its entry points):

    bash scripts/trainer_venv.sh && .venv-trainers/bin/python -m pytest tests/trainers/test_verl_config.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402

from rollout_plugin.adapters.verl.check import check, compose_verl, summary  # noqa: E402
from rollout_plugin.adapters.verl.router import parse_settings  # noqa: E402
from rollout_plugin.cli.main import main as cli_main  # noqa: E402
from rollout_plugin.errors import ConfigError  # noqa: E402
from rollout_plugin.tuning import (  # noqa: E402
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    Pins,
    WorkloadSpec,
    load_hf_config,
    make_plan,
)

ROOT = Path(__file__).parents[2]
GROUPS = ("tuned", "pool", "long_context")
# (model, n, prompt, response, train batch, mini batch, GPUs per node, nodes, extra overrides)
WORKLOADS = (
    ("qwen2.5-0.5b", 8, 512, 1024, 256, 64, 8, 1, ()),
    ("qwen2.5-7b", 8, 1024, 4096, 256, 64, 8, 1, ()),
    ("qwen2.5-7b", 16, 1024, 15360, 128, 32, 8, 2, ()),
    ("qwen2.5-7b", 4, 2048, 2048, 64, 16, 8, 1, ("actor_rollout_ref.actor.fsdp_config.param_offload=true",)),
    ("llama-3.1-8b", 8, 1024, 3072, 128, 32, 8, 1, ("algorithm.adv_estimator=gae",)),
    ("qwen3-8b", 8, 1024, 7168, 128, 32, 8, 1, ("rollout_pool.hardware=h200-141",)),
)


def _hf_dir(name: str, root: Path) -> str:
    """A local stand-in for the hub model (its config.json, from the preset's figures)."""
    m = MODEL_PRESETS[name]
    family = "llama" if name.startswith("llama") else ("qwen3" if name.startswith("qwen3") else "qwen2")
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": family, "architectures": [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                                  "qwen2": "Qwen2ForCausalLM"}[family]],
        "num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.intermediate_size,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings, "torch_dtype": m.dtype,
        "tie_word_embeddings": m.tie_word_embeddings}))
    return str(d)


def _overrides(workload, model_path: str) -> list[str]:
    _, n, prompt, response, batch, mini, gpus, nodes, extra = workload
    return [f"actor_rollout_ref.model.path={model_path}", "algorithm.adv_estimator=grpo",
            f"data.max_prompt_length={prompt}", f"data.max_response_length={response}",
            f"data.train_batch_size={batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
            f"actor_rollout_ref.rollout.n={n}", f"trainer.n_gpus_per_node={gpus}", f"trainer.nnodes={nodes}",
            "+critic.model.load_tokenizer=false", "+actor_rollout_ref.model.load_tokenizer=false",
            f"critic.model.path={model_path}", *extra]


def _expected_plan(workload, group: str, path: str):
    """What the planner promises for this workload and model directory, computed here without verl."""
    name, n, prompt, response, batch, mini, gpus, nodes, extra = workload
    hw = "h200-141" if "rollout_pool.hardware=h200-141" in extra else "h100-80"
    w = WorkloadSpec(max_prompt_length=prompt, max_response_length=response, n=n, train_batch_size=batch,
                     ppo_mini_batch_size=mini, offload=any("param_offload=true" in e for e in extra),
                     adv_estimator="gae" if "algorithm.adv_estimator=gae" in extra else "grpo")
    model = load_hf_config(path)
    hardware = dataclasses.replace(HARDWARE_PRESETS[hw], gpus_per_node=gpus, nodes=nodes)
    plan = make_plan(model, hardware, w)
    if group == "long_context":
        pins = {}
        if plan.verl.ulysses_sp < 2:
            pins["ulysses_sp"] = 2
        smaller = int(plan.engine.max_num_seqs * 0.5)
        pins["max_num_seqs"] = max(n, smaller // 8 * 8 if smaller >= 8 else smaller)
        plan = make_plan(model, hardware, w, Pins(**pins))
    return plan


def _validate(cfg, *, fixed_batches: bool = True):
    """verl's own checks, as main_ppo runs them, plus its dataclass conversions."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    use_critic = need_critic(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=use_critic)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    critic = omega_conf_to_dataclass(cfg.critic) if use_critic else None
    if fixed_batches:  # verl skips its micro-batch checks under dynamic batching: run them too
        fixed = cfg.copy()
        for key, value in (("actor_rollout_ref.actor.use_dynamic_bsz", False),
                           ("actor_rollout_ref.actor.use_kl_loss", True), ("critic.use_dynamic_bsz", False)):
            OmegaConf.update(fixed, key, value)
        validate_config(fixed, use_reference_policy=True, use_critic=use_critic)
    return actor, rollout, model, critic


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w[0]}-n{w[1]}-{w[2]}+{w[3]}-{w[6]}x{w[7]}")
@pytest.mark.parametrize("group", GROUPS)
def test_group_composes_validates_and_matches_the_plan(group, workload, tmp_path_factory):
    path = _hf_dir(workload[0], tmp_path_factory.getbasetemp())
    cfg = compose_verl([f"+rollout_pool={group}", *_overrides(workload, path)])
    OmegaConf.resolve(cfg)  # what verl's TaskRunner does first
    actor, rollout, model, critic = _validate(cfg)
    plan = _expected_plan(workload, group, path)

    assert model.hf_config.num_hidden_layers == plan.model.num_layers
    assert actor.ppo_micro_batch_size_per_gpu == plan.verl.micro_batch_per_gpu
    assert actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu == plan.verl.ppo_max_token_len_per_gpu
    assert actor.ulysses_sequence_parallel_size == plan.verl.ulysses_sp
    ref = cfg.actor_rollout_ref.ref
    # Forward-only log-probs: the memory model's forward budget, not 2× the training values.
    assert ref.log_prob_micro_batch_size_per_gpu == plan.verl.log_prob_micro_batch_per_gpu
    assert rollout.log_prob_micro_batch_size_per_gpu == plan.verl.log_prob_micro_batch_per_gpu
    assert ref.log_prob_max_token_len_per_gpu == plan.verl.log_prob_max_token_len_per_gpu
    assert rollout.log_prob_max_token_len_per_gpu == plan.verl.log_prob_max_token_len_per_gpu
    assert rollout.tensor_model_parallel_size == plan.engine.tensor_parallel_size
    assert rollout.gpu_memory_utilization == plan.engine.gpu_memory_utilization
    assert rollout.max_model_len == plan.engine.max_model_len == workload[2] + workload[3]
    assert rollout.max_num_batched_tokens >= max(rollout.max_model_len, 8192)
    assert rollout.max_num_seqs == plan.engine.max_num_seqs >= workload[1]
    assert not rollout.disable_log_stats and rollout.enable_prefix_caching
    assert (critic is not None) == ("algorithm.adv_estimator=gae" in workload[8])
    if critic is not None:
        assert critic.ppo_micro_batch_size_per_gpu == plan.verl.critic_micro_batch_per_gpu
    if group == "tuned":
        assert rollout.router_config_path is None
    else:
        assert Path(rollout.router_config_path).is_file()
        assert OmegaConf.load(rollout.router_config_path).router_class.endswith("RolloutPoolRouter")
        settings = parse_settings(rollout.custom["rollout_pool"])  # what each server hands the router
        assert settings.imbalance == (0.5 if group == "long_context" else 0.25)
    if group == "long_context":
        assert actor.ulysses_sequence_parallel_size >= 2
        tuned = _expected_plan(workload, "tuned", path)
        assert rollout.max_num_seqs <= tuned.engine.max_num_seqs


def test_user_values_win_and_derived_values_follow_them(tmp_path):
    path = _hf_dir("qwen2.5-7b", tmp_path)
    base = _overrides(WORKLOADS[1], path)
    cfg = compose_verl(["+rollout_pool=pool", *base, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                        "actor_rollout_ref.rollout.gpu_memory_utilization=0.55",
                        "actor_rollout_ref.rollout.max_model_len=20000"])
    OmegaConf.resolve(cfg)
    _validate(cfg)
    r = cfg.actor_rollout_ref
    assert r.actor.ppo_micro_batch_size_per_gpu == 2
    assert r.ref.log_prob_micro_batch_size_per_gpu == r.rollout.log_prob_micro_batch_size_per_gpu == 4  # 2 × 2 fits
    assert r.rollout.gpu_memory_utilization == 0.55
    assert r.rollout.max_model_len == 20000 and r.rollout.max_num_batched_tokens >= 20000
    # The pin is planned around: the KV cache (and so the cap) is what 0.55 of the GPU holds.
    w = WorkloadSpec(max_prompt_length=1024, max_response_length=4096, n=8, train_batch_size=256,
                     ppo_mini_batch_size=64)
    pinned = make_plan(load_hf_config(path), HARDWARE_PRESETS["h100-80"], w, Pins(gpu_memory_utilization=0.55))
    assert r.rollout.max_num_seqs == pinned.engine.max_num_seqs


def test_a_global_micro_batch_is_normalized_per_gpu(tmp_path):
    """verl refuses both forms; a user's global value leaves ours unset and the log-prob one per GPU."""
    path = _hf_dir("qwen2.5-7b", tmp_path)
    cfg = compose_verl(["+rollout_pool=tuned", *_overrides(WORKLOADS[1], path),
                        "actor_rollout_ref.actor.ppo_micro_batch_size=64"])
    OmegaConf.resolve(cfg)
    _validate(cfg)
    assert cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu is None
    # 2 × (64 ÷ 8 GPUs) = 16 sequences of 5120 tokens would not fit the forward budget: what does.
    budget = _expected_plan(WORKLOADS[1], "tuned", path).verl.log_prob_token_budget
    assert cfg.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu == min(2 * 64 // 8, budget // 5120) < 16


def test_a_broken_batch_fails_with_our_message(tmp_path):
    path = _hf_dir("qwen2.5-7b", tmp_path)
    cfg = compose_verl(["+rollout_pool=pool", *_overrides(WORKLOADS[1], path), "data.train_batch_size=100"])
    with pytest.raises(Exception) as info:
        OmegaConf.resolve(cfg)
    assert "actor_rollout_ref.actor.ppo_mini_batch_size=64: must divide data.train_batch_size (100)" in str(info.value)


def test_verl_check_reports_every_problem_at_once(tmp_path):
    path = _hf_dir("qwen2.5-7b", tmp_path)
    report = check([*_overrides(WORKLOADS[1], path), "data.train_batch_size=100", "rollout_pool.hardware=h100"])
    keys = [p.key for p in report.problems]
    assert report.overrides[0] == "+rollout_pool=pool"  # ours added when the user named no group
    assert keys == ["rollout_pool.hardware", "actor_rollout_ref.actor.ppo_mini_batch_size"], report.problems
    assert report.problems[0].suggestion == "rollout_pool.hardware=h100-80"

    # Planner-valid shape, but final values that verl (or the engine) would trip over later.
    report = check(["+rollout_pool=tuned", *_overrides(WORKLOADS[1], path),
                    "actor_rollout_ref.actor.use_dynamic_bsz=false",
                    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
                    "actor_rollout_ref.rollout.max_num_batched_tokens=2048",
                    "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.temperature=0"])
    text = "\n".join(map(str, report.problems))
    assert "actor_rollout_ref.rollout.max_num_batched_tokens=2048: below max_model_len (5120)" in text
    assert "(try actor_rollout_ref.rollout.max_num_batched_tokens=8192)" in text
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3: must divide the per-GPU mini-batch" in text
    assert "verl='validate_config': AssertionError: validation gen temperature should be greater than 0" in text

    # A pin the planner cannot plan around is reported in verl's terms.
    report = check(["+rollout_pool=pool", *_overrides(WORKLOADS[1], path), "actor_rollout_ref.rollout.max_num_seqs=4"])
    assert [str(p) for p in report.problems] == [
        "actor_rollout_ref.rollout.max_num_seqs=4: a group of n=8 goes to one engine and must fit its cap "
        "(try actor_rollout_ref.rollout.max_num_seqs=8)"]

    ok = check(["+rollout_pool=long_context", *_overrides(WORKLOADS[2], path)])
    assert ok.ok, ok.problems


def test_verl_check_cli(capsys, tmp_path):
    path = _hf_dir("qwen2.5-0.5b", tmp_path)
    assert cli_main(["verl-check", *_overrides(WORKLOADS[0], path), "data.train_batch_size=100"]) == 1
    err = capsys.readouterr().err
    assert "verl-check: 1 problem(s) in: python -m verl.trainer.main_ppo +rollout_pool=pool" in err
    assert "  - actor_rollout_ref.actor.ppo_mini_batch_size=64: must divide data.train_batch_size (100)" in err
    assert cli_main(["verl-check", *_overrides(WORKLOADS[0], path)]) == 0
    assert "actor_rollout_ref.rollout.max_num_seqs = " in capsys.readouterr().out


def test_planner_errors_are_config_errors_in_verl_terms(tmp_path):
    cfg = compose_verl(["+rollout_pool=tuned", "actor_rollout_ref.model.path=/no/such/model"])
    from rollout_plugin.adapters.verl.resolvers import plan_for

    with pytest.raises(ConfigError, match="actor_rollout_ref.model.path='/no/such/model': neither a local"):
        plan_for(cfg)


def _recipe_overrides(script: Path) -> list[str]:
    out = subprocess.run(["bash", str(script)], env={**os.environ, "LAUNCH": "printf %s\\n"}, capture_output=True,
                         text=True, timeout=60, check=True)
    return [line for line in out.stdout.splitlines() if line]


RECIPES = sorted((ROOT / "recipes" / "verl").glob("*.sh"))


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.stem)
def test_recipe_composes_and_passes_verl_check(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# "), "a recipe starts with what it needs and how to run it"
    overrides = _recipe_overrides(script)
    assert any(o.startswith("+rollout_pool=") for o in overrides)
    report = check(overrides)
    assert report.ok, "\n".join(map(str, report.problems))


def test_entry_point_is_loaded_by_a_plain_import_verl():
    code = ("import sys, verl\n"
            "from omegaconf import OmegaConf\n"
            "print('resolver', OmegaConf.has_resolver('rollout_pool.tuned'))\n"
            "print('module', 'rollout_plugin.adapters.verl.plugin' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resolver True" in proc.stdout and "module True" in proc.stdout


def test_verl_check_warns_when_the_admission_wait_approaches_the_timeout(tmp_path):
    """The planner's throughput model against the router's admission_timeout_s: a warning, not a refusal."""
    path = _hf_dir("qwen2.5-7b", tmp_path)
    long = _overrides(WORKLOADS[2], path)  # 128 prompts × 16 samples of 1K + 15K tokens on 16 GPUs
    calm = check(long)
    assert calm.ok and calm.warnings == [] and calm.rollout is not None
    assert 0 < calm.rollout.wait_s < 0.5 * 1800
    tight = check([*long, "rollout_pool.router.admission_timeout_s=600"])
    assert tight.ok and len(tight.warnings) == 1
    (warning,) = tight.warnings
    assert warning.startswith("rollout_pool.router.admission_timeout_s=600: a request may wait ~")
    assert "verl fails the step" in warning and "set rollout_pool.router.admission_timeout_s=" in warning
    assert "warning: rollout_pool.router.admission_timeout_s=600" in summary(tight)
    # verl's own router (the `tuned` group) has no admission queue to wait in.
    assert check(["+rollout_pool=tuned", *long]).rollout is None

