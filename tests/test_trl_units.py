"""TRL adapter logic that needs no engine: version pin, sampling mapping, weight naming, recipes, plan, attention shim."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from rollout_plugin.errors import ConfigError, TrainerAdapterError  # noqa: E402
from rollout_plugin.types import Request, Result, Sample, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.0rc1"])
def test_supported_trl_versions_pass(version):
    from rollout_plugin.adapters.trl.compat import check_trl_version

    check_trl_version(version)


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "0.29.1", "2.0"])
def test_other_trl_versions_fail_with_the_fix(version):
    from rollout_plugin.adapters.trl.compat import check_trl_version

    with pytest.raises(TrainerAdapterError, match=r'pip install "trl>=1.16,<1.17"'):
        check_trl_version(version)


def _trainer_args(**over):
    base = dict(max_completion_length=8, temperature=0.7, top_p=0.9, top_k=0, min_p=None, repetition_penalty=1.0,
                generation_kwargs=None, vllm_structured_outputs_regex=None)
    return SimpleNamespace(args=SimpleNamespace(**{**base, **over}))


def test_trainer_sampling_maps_trl_settings_and_asks_for_logprobs():
    from rollout_plugin.adapters.trl.backend import trainer_sampling

    sp = trainer_sampling(_trainer_args(top_k=5))
    assert sp == SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, logprobs=True)
    assert trainer_sampling(_trainer_args()).top_k == -1  # TRL's 0 = off = vLLM's -1


def test_trainer_sampling_refuses_all_unsupported_settings_at_once():
    from rollout_plugin.adapters.trl.backend import trainer_sampling

    with pytest.raises(TrainerAdapterError) as err:
        trainer_sampling(_trainer_args(repetition_penalty=1.1, min_p=0.05))
    assert "repetition_penalty=1.1" in str(err.value) and "min_p=0.05" in str(err.value)


def test_failed_rollouts_fail_the_step_and_good_ones_unpack_in_group_order():
    from rollout_plugin.adapters.trl.backend import checked, unpack

    req = Request("a", [1, 2], n=2)
    ok = Result("a", samples=(Sample("x", (5, 6), (-0.1, -0.2)), Sample("y", (7,), (-0.3,))), weight_version=4,
                request=req)
    ids, lps, versions = unpack(checked([ok]))
    assert ids == [[5, 6], [7]] and lps == [[-0.1, -0.2], [-0.3]] and versions == [4, 4]
    with pytest.raises(TrainerAdapterError, match="1 of 2 rollout requests failed; first: b: boom"):
        checked([ok, Result("b", error="boom")])


def test_weights_are_written_under_the_checkpoint_names_vllm_loads(model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rollout_plugin.adapters.trl.weights import named_weights, write_weights

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    path = write_weights(named_weights(model), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as mine, safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as orig:
        assert set(mine.keys()) == set(orig.keys())
        key = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(mine.get_tensor(key), orig.get_tensor(key))  # bf16 -> fp32 -> bf16 is exact
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_apply_plan_fills_only_what_the_user_left_open():
    from rollout_plugin.adapters.trl.plan import apply_plan

    planned = {"gradient_checkpointing": True, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8,
               "learning_rate": 1.0}
    out, changes = apply_plan({"per_device_train_batch_size": 16}, planned,
                              {"gradient_checkpointing": False, "gradient_accumulation_steps": 1})
    assert out == {"per_device_train_batch_size": 16, "gradient_checkpointing": True, "gradient_accumulation_steps": 8}
    assert changes == ["trl.gradient_checkpointing: False -> True (planner)",
                       "trl.gradient_accumulation_steps: 1 -> 8 (planner)"]
    assert apply_plan({"a": 1}, None) == ({"a": 1}, [])


def _compose(args):
    from rollout_plugin.adapters.trl.config import TrlGrpoConfig, register_trl_configs
    from rollout_plugin.cli.app import compose
    from rollout_plugin.cli.trl_grpo import _recipe

    register_trl_configs()
    return compose("trl_grpo", _recipe(args), TrlGrpoConfig)


def test_recipes_compose_and_the_command_line_wins():
    cfg = _compose(["--recipe", str(ROOT / "recipes/trl/cpu_tiny.yaml"), "trl.max_steps=3", "route=rollout_func"])
    assert cfg.trl["max_steps"] == 3 and cfg.trl["num_generations"] == 8
    assert cfg.engine.dev_mode and cfg.engine.max_model_len == 512
    assert cfg.rewards[0].kwargs == {"token_id": 1979} and cfg.route.value == "rollout_func"
    gpu = _compose(["--recipe", str(ROOT / "recipes/trl/gpu_qwen_gsm8k.yaml")])
    assert gpu.engine.model == gpu.trainer_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert gpu.dataset.path.endswith(":gsm8k_dataset") and gpu.trl["bf16"] is True


def test_every_recipe_yaml_starts_with_its_command():
    for path in [*ROOT.glob("recipes/trl/*.yaml"), ROOT / "hydra_conf/trl_grpo.yaml"]:
        assert path.read_text().startswith("# rollout-plugin trl-grpo"), path


def test_unknown_grpo_keys_are_reported_together_with_the_nearest_field():
    import dataclasses

    from trl import GRPOConfig

    from rollout_plugin.adapters.trl.entry import grpo_kwargs

    cfg = _compose(["trl.max_stepz=3", "trl.num_generation=4"])
    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    with pytest.raises(ConfigError) as err:
        grpo_kwargs(cfg, fields, None)
    text = str(err.value)
    assert "trl.max_stepz=3: not a GRPOConfig field (try trl.max_steps=…)" in text
    assert "trl.num_generation=4" in text and "trl.num_generations=…" in text


def test_attach_refuses_what_it_cannot_serve():
    from rollout_plugin.adapters.trl import attach

    with pytest.raises(TrainerAdapterError, match="serves GRPOTrainer and RLOOTrainer, not SimpleNamespace"):
        attach(SimpleNamespace(), None)


def test_pool_metrics_report_tokens_per_second_between_snapshots():
    from rollout_plugin.adapters.trl.callback import PoolMetrics
    from rollout_plugin.pool.stats import EngineStats, PoolStats

    class Pool:  # the stats a SyncRolloutPool reports, in memory
        weight_version = 2
        tokens, elapsed = 0, 0.0

        def stats(self):
            e = EngineStats("e0", True, 3, 16, 1, 1, 1, self.tokens, 0, 1.0, 3)
            return PoolStats(self.elapsed, [e], 1, 0, 1, 5)

        def run(self, fn):
            return None  # no engine telemetry yet

    pool, metrics = Pool(), PoolMetrics()
    first = metrics.snapshot(pool)
    assert "tokens_per_s" not in first and first["inflight"] == 3 and first["queued"] == 5
    pool.tokens, pool.elapsed = 500, 2.0
    assert metrics.snapshot(pool)["tokens_per_s"] == 250.0


def test_torch_tree_attention_matches_causal_attention_per_segment():
    from rollout_plugin.adapters.trl.async_worker import _TorchVarlen

    torch.manual_seed(0)
    lens = [3, 5]
    q = torch.randn(sum(lens), 4, 8)
    k = torch.randn(sum(lens), 2, 8)  # grouped-query: 2 kv heads for 4 query heads
    v = torch.randn(sum(lens), 2, 8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = _TorchVarlen.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, softmax_scale=None, causal=True)
    for a, b in ((0, 3), (3, 8)):
        qi, ki, vi = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(qi, ki.repeat_interleave(2, 0),
                                                               vi.repeat_interleave(2, 0), is_causal=True)
        assert torch.allclose(out[a:b], ref.transpose(0, 1), atol=1e-5)


def test_importing_the_adapter_does_not_import_trl():
    import subprocess
    import sys

    code = ("import sys, rollout_plugin.trl, rollout_plugin.adapters.trl.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
