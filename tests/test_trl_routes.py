"""TRL GRPO through the rollout pool, against a real vLLM CPU engine: the backend, rollout_func, weight sync.

The session's engine (dev mode, for in-place weight reloads) serves the module; every trainer starts
from the embedded model's weights and pushes them to the engine before its first generation, and the
engine gets the original weights back when the module is done.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from rollout_plugin import EngineConfig, PoolConfig, Request, SamplingParams, SyncRolloutPool  # noqa: E402

pytestmark = pytest.mark.engine

K = 4  # num_generations
BF16_TOL = 0.05  # nats: engine (bf16 weights) vs trainer (fp32) on the same tokens


def high_ids_reward(prompts, completions, completion_ids, **kwargs):
    """Always varies within a group, so every step has a non-zero advantage and really moves the weights."""
    return [sum(ids) / (len(ids) * 2404) if ids else 0.0 for ids in completion_ids]


@pytest.fixture(scope="module")
def pool(live_engine):
    """The session's engine (dev mode) behind a pool; its original weights are put back afterwards."""
    from rollout_plugin.adapters.common.weights import reload_engines

    eng = EngineConfig(urls=[live_engine.url], api_key=live_engine.api_key, max_model_len=1024)
    with SyncRolloutPool(eng, PoolConfig(k=K)) as p:
        try:
            yield p
        finally:
            p.run(lambda pool: reload_engines(pool, live_engine.model_dir, 0))


def grpo_args(out: Path, steps: int = 3, lr: float = 1e-2):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(out), per_device_train_batch_size=2 * K, num_generations=K,
                      max_completion_length=8, max_steps=steps, learning_rate=lr, logging_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", model_init_kwargs={"dtype": "float32"},
                      seed=0)


def make_trainer(model_dir: str, out: Path, rewards=high_ids_reward, **kwargs):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from rollout_plugin.adapters.trl.tasks import arith_dataset

    return GRPOTrainer(model=model_dir, reward_funcs=rewards, args=grpo_args(out), train_dataset=arith_dataset(32),
                       processing_class=AutoTokenizer.from_pretrained(model_dir), **kwargs)


def engine_vs_trainer(pool: SyncRolloutPool, model, tokenizer) -> tuple[list[float], list[float], int]:
    """The engine's logprobs for a fixed prompt's greedy tokens, the trainer model's for the same tokens."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    (res,) = pool.generate([Request("probe", list(prompt), sampling=SamplingParams(
        max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True))])
    assert res.ok, res.error
    sample = res.samples[0]
    ids = torch.tensor([list(prompt) + list(sample.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    mine = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
    return list(sample.logprobs), mine.tolist(), res.weight_version


def test_backend_runs_grpo_and_syncs_real_weights(pool, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rollout_plugin.trl import attach

    trainer = make_trainer(model_dir, tmp_path)
    cb = attach(trainer, pool)
    trainer.train()

    # Three optimizer steps, each published once (version 0 = the initial push before the first generation).
    assert trainer.state.global_step == 3
    assert [r.version for r in cb.weights.history] == [0, 1, 2, 3]
    assert pool.weight_version == 3
    # Step 3's generation ran on the weights of step 2, and the results say so.
    assert set(trainer.vllm_generation.last_versions) == {2}

    # The engine now serves the trained weights: its logprobs match the trainer model's ...
    engine_lp, trainer_lp, version = engine_vs_trainer(pool, trainer.model, trainer.processing_class)
    assert version == 3
    assert max(abs(a - b) for a, b in zip(engine_lp, trainer_lp)) < BF16_TOL
    # ... and not the initial model's (the lr is high enough that this is not a tolerance accident).
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _, base_lp, _ = engine_vs_trainer(pool, base, trainer.processing_class)
    assert max(abs(a - b) for a, b in zip(engine_lp, base_lp)) > 5 * BF16_TOL

    # The importance-sampling correction ran on the pool's logprobs (TRL logs it only on its vLLM path).
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3
    assert all(abs(row["sampling/importance_sampling_ratio/mean"] - 1.0) < 0.05 for row in logs)
    # Pool metrics reached the trainer's logs (so every report_to integration sees them).
    for key in ("weight_sync_s", "inflight", "cap", "weight_version", "requests_failed"):
        assert all(f"rollout_pool/{key}" in row for row in logs), key
    assert any(row.get("rollout_pool/tokens_per_s", 0) > 0 for row in logs)
    assert [row["rollout_pool/weight_version"] for row in logs] == [1, 2, 3]


def test_rollout_func_route_with_callback(pool, model_dir, tmp_path):
    from rollout_plugin.trl import RolloutPoolCallback

    seen_versions: list[int] = []
    seen_spans: list = []

    def reward(prompts, completions, completion_ids, weight_version, weight_segments, **kwargs):
        seen_versions.extend(weight_version)  # extra rollout_func keys reach reward functions
        seen_spans.extend(zip(weight_segments, completion_ids, weight_version))
        return high_ids_reward(prompts, completions, completion_ids)

    cb = RolloutPoolCallback(pool)
    trainer = make_trainer(model_dir, tmp_path, rewards=reward, callbacks=[cb], rollout_func=cb.rollout_func)
    trainer.train()

    assert trainer.state.global_step == 3
    assert [r.version for r in cb.weights.history] == [0, 1, 2, 3]
    # Each step's completions came from the weights published after the previous step.
    assert sorted(set(seen_versions)) == [0, 1, 2]
    assert len(seen_versions) == 3 * 2 * K
    # Nothing crossed a weight update here: one span per completion, all its tokens, under its version.
    assert all(spans == [(v, 0, len(ids))] for spans, ids, v in seen_spans)
    engine_lp, trainer_lp, _ = engine_vs_trainer(pool, trainer.model, trainer.processing_class)
    assert max(abs(a - b) for a, b in zip(engine_lp, trainer_lp)) < BF16_TOL
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert all("rollout_pool/weight_sync_s" in row and math.isfinite(row["loss"]) for row in logs)


def test_async_grpo_trainer_trains_on_pool_rollouts(pool, model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from rollout_plugin.adapters.trl.tasks import arith_dataset
    from rollout_plugin.trl import AsyncRolloutConfig, PoolRolloutWorker, PoolWeightTransfer, async_grpo_on_cpu

    async_grpo_on_cpu()
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = arith_dataset(32)
    cfg = AsyncRolloutConfig(in_flight=3, queue_maxsize=4 * K, max_staleness=2)  # update_mode: continue (default)
    worker = PoolRolloutWorker(pool, data, [high_ids_reward], tok, num_generations=K,
                               sampling=SamplingParams(max_tokens=8), config=cfg)
    transfer = PoolWeightTransfer(pool, tmp_path / "weights", config=cfg)
    args = AsyncGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * K, num_generations=K,
                           max_completion_length=8, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                           use_cpu=True, bf16=False, save_strategy="no", dtype="float32", token_budget=512,
                           max_staleness=2, weight_sync_steps=1)
    trainer = AsyncGRPOTrainer(model=model_dir, reward_funcs=[high_ids_reward], args=args, train_dataset=data,
                               processing_class=tok, rollout_worker=worker, weight_transfer=transfer)
    trainer.train()

    assert trainer.state.global_step == 3
    # One cold sync at train begin, then one per optimizer step; the pool serves what the trainer counts.
    assert transfer.version == trainer.model_version == 4
    assert pool.weight_version == 4
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3 and all(math.isfinite(row["loss"]) for row in logs)
    # Staleness stayed within the bound; the worker's pool metrics reached the trainer's logs.
    assert all(row["sample/staleness_max"] <= 2 for row in logs if "sample/staleness_max" in row)
    assert any("rollout_pool/tokens_per_s" in row for row in trainer.state.log_history)
    # Generation went on while the trainer trained: the worker is ahead of what was consumed.
    assert worker.produced > 3 * 2 * K
    # No group failed; each sample's version count reached the trainer's metrics.
    assert worker.failed == 0 and worker.groups_out >= 3 * 2
    assert any("rollout_pool/versions_spanned" in row for row in logs)


def test_trl_grpo_command_runs_the_cpu_recipe(pool, tmp_path, capsys):
    from rollout_plugin.cli.main import main

    ep = pool.endpoints[0]  # the module's engine, attached instead of launching another on a 2-core box
    root = Path(__file__).resolve().parents[1]
    rc = main(["trl-grpo", "--recipe", str(root / "recipes/trl/cpu_tiny.yaml"), "trl.max_steps=3",
               f"trl.output_dir={tmp_path}", "trl.per_device_train_batch_size=8", "trl.num_generations=4",
               "trl.max_completion_length=8", f"engine.urls=['{ep.url}']", f"engine.api_key={ep.api_key}",
               "log_level=WARNING"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "trl-grpo: 3 steps" in out and "weights at version 3" in out


def test_backend_serves_rloo_too(pool, model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from rollout_plugin.adapters.trl.tasks import arith_dataset
    from rollout_plugin.trl import attach

    args = RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * K, num_generations=K,
                      max_completion_length=8, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", model_init_kwargs={"dtype": "float32"})
    trainer = RLOOTrainer(model=model_dir, reward_funcs=high_ids_reward, args=args, train_dataset=arith_dataset(16),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    cb = attach(trainer, pool)
    trainer.train()
    assert trainer.state.global_step == 2
    assert [r.version for r in cb.weights.history] == [0, 1, 2]
    engine_lp, trainer_lp, _ = engine_vs_trainer(pool, trainer.model, trainer.processing_class)
    assert max(abs(a - b) for a, b in zip(engine_lp, trainer_lp)) < BF16_TOL
