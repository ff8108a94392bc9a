"""One rank of a GRPO job through the rollout pool, run by ``accelerate launch`` from tests/test_trl_multirank.py.

The README's three lines (``make_pool`` + ``attach``) on the tiny model, attached to the test session's
engine (``RP_ENGINE_URL`` / ``RP_ENGINE_KEY``). Each rank writes ``rank<i>.json`` into ``RP_OUT``: whether
it held a pool, the weight-sync records, and (after training) the engine's logprobs for a fixed prompt
next to the trained model's — the forward pass runs on every rank, since under FSDP and ZeRO-3 it is a
collective.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from rollout_plugin import EngineConfig, PoolConfig, Request, SamplingParams
from rollout_plugin.adapters.trl.tasks import arith_dataset
from rollout_plugin.trl import attach, make_pool

K = 4


def high_ids_reward(prompts, completions, completion_ids, **kwargs):
    """Varies within a group, so every step has a non-zero advantage and really moves the weights."""
    return [sum(ids) / (len(ids) * 2404) if ids else 0.0 for ids in completion_ids]


def token_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def cpu_fsdp_shim() -> None:
    """accelerate 1.15 turns FSDP on only for GPU-like process groups; call this CPU (gloo) group one, so the
    trainer shards its model with FSDP2 on CPU. Test-only: it changes nothing but that one decision."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    assert state.distributed_type is DistributedType.MULTI_CPU and state.device.type == "cpu"
    state.distributed_type = DistributedType.MULTI_GPU


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("rollout_plugin").addHandler(handler)
    logging.getLogger("rollout_plugin").setLevel(logging.INFO)  # the weight-sync lines (gather cost) are INFO
    model_dir, out = os.environ["RP_MODEL_DIR"], Path(os.environ["RP_OUT"])
    engine = EngineConfig(urls=[os.environ["RP_ENGINE_URL"]], api_key=os.environ["RP_ENGINE_KEY"], max_model_len=1024)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # accelerate runs DeepSpeed only outside its CPU mode: then the ranks form a plain gloo group instead
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=K // 2, num_generations=K,
                      max_completion_length=8, max_steps=int(os.environ.get("RP_STEPS", "2")), learning_rate=1e-2,
                      logging_steps=1, report_to=[], use_cpu=not deepspeed, ddp_backend="gloo" if deepspeed else None,
                      bf16=False, save_strategy="no",
                      model_init_kwargs={"dtype": "float32"}, seed=0)
    with make_pool(engine, PoolConfig(k=K)) as pool:  # the README's lines: one pool, on rank 0
        if os.environ.get("ACCELERATE_USE_FSDP") == "true":
            cpu_fsdp_shim()
        trainer = GRPOTrainer(model=model_dir, reward_funcs=high_ids_reward, args=args,
                              train_dataset=arith_dataset(32), processing_class=tok)
        cb = attach(trainer, pool, weights_dir=out / "weights")
        trainer.train()
        acc = trainer.accelerator
        report = {"rank": acc.process_index, "world": acc.num_processes, "pool": pool is not None,
                  "history": [asdict(r) for r in cb.weights.history]}

        # The engine's greedy tokens for a fixed prompt (rank 0 asks), scored by the trained model on every rank.
        prompt = list(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        probe = None
        if pool is not None:
            (res,) = pool.generate([Request("probe", prompt, sampling=SamplingParams(
                max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True))])
            assert res.ok, res.error
            probe = (list(res.samples[0].token_ids), list(res.samples[0].logprobs), res.weight_version)
        tokens, engine_lp, version = broadcast_object_list([probe], from_process=0)[0]
        report.update(prompt=prompt, tokens=tokens, engine_lp=engine_lp, engine_version=version,
                      trainer_lp=token_logprobs(trainer.model, prompt, tokens))
        (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
        acc.wait_for_everyone()


if __name__ == "__main__":
    main()
