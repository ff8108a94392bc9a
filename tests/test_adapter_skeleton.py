"""The adapter skeleton of docs/adapters.md run against the real CPU engine, and the shape of adapters/common:
one oldest-version function for the pool and the adapters, no import cycle among the adapters' modules (even
through function-level imports), and every pool entry point the doc names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_pool_and_every_adapter_judge_staleness_with_one_function():
    from rollout_plugin.adapters.common import translate, versions
    from rollout_plugin.pool.dispatch import outcomes
    from rollout_plugin.types import Result, Sample, Segment, oldest_version

    assert outcomes._oldest is oldest_version and versions.oldest_version is oldest_version
    assert translate.oldest_version is oldest_version
    crossed = Sample("a", (1, 2), segments=(Segment(3, 0, 1), Segment(4, 1, 2)))
    assert oldest_version([crossed, Sample("b", (1,), segments=(Segment(5, 0, 1),))], 9) == 3
    assert oldest_version([Sample("c", (1,))], 7) == 7  # no segments: the engine's version
    assert versions.staleness_version(Result("r", samples=(crossed,), weight_version=4)) == 3


def _components(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of the import graph restricted to ``modules``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v) & modules:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_the_adapters_modules_import_each_other_without_a_cycle_even_inside_functions():
    grimp = pytest.importorskip("grimp")

    graph = grimp.build_graph("rollout_plugin", exclude_type_checking_imports=True)
    adapters = {m for m in graph.modules if m.startswith("rollout_plugin.adapters.")}
    # Package __init__ re-exports point back at their own modules by design; a cycle is between modules.
    modules = {m for m in adapters if not any(o.startswith(m + ".") for o in adapters)}
    assert _components(graph, modules) == []


def test_every_pool_entry_point_the_adapter_doc_names_exists():
    from rollout_plugin.pool import RolloutPool, SyncRolloutPool

    text = (ROOT / "docs" / "adapters.md").read_text()
    named = set(re.findall(r"`(RolloutPool|SyncRolloutPool)\.(\w+)", text))
    assert len(named) >= 8, named
    missing = [f"{cls}.{attr}" for cls, attr in sorted(named)
               if not hasattr({"RolloutPool": RolloutPool, "SyncRolloutPool": SyncRolloutPool}[cls], attr)]
    assert missing == []
    assert "rollout_plugin/adapters/common/skeleton.py" in text  # the doc's worked example is the file run below


@pytest.mark.engine
def test_the_skeleton_generates_trains_and_pushes_weights_on_the_cpu_engine(live_engine, model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout_plugin.adapters.common.skeleton import PoolRollouts, SkeletonConfig, train
    from rollout_plugin.config.schema import EngineConfig
    from rollout_plugin.types import SamplingParams

    engine = EngineConfig(urls=[live_engine.url], api_key=live_engine.api_key, max_model_len=1024, dev_mode=True)
    cfg = SkeletonConfig(engine=engine, weights_dir=str(tmp_path / "weights"), n_samples_per_prompt=3,
                         rollout_batch_size=2, sampling=SamplingParams(max_tokens=8, logprobs=True))
    # The engine's own weights, pushed back unchanged: the session's engine is shared with other tests.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], "Count: 1 2 3", "Hello"]
    seen: list[list] = []

    with PoolRollouts(cfg, tokenizer, reward_fn=lambda p, c: sum(t == 17 for t in c) / max(len(c), 1)) as rollouts:
        logs = train(rollouts, model, prompts, steps=2, train_step=lambda m, batch: seen.append(batch))
        assert rollouts.pool.weight_version == 2

    assert [len(batch) for batch in seen] == [6, 6]  # 2 groups of 3 per step
    for step, batch in enumerate(seen):
        assert {e.weight_version for e in batch} == {step}  # step 2 generated under the weights pushed after 1
        for e in batch:
            assert e.completion_ids and len(e.logprobs) == len(e.completion_ids) and 0.0 <= e.reward <= 1.0
    assert seen[0][0].prompt_ids == tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"]
    assert seen[1][0].prompt_ids == tokenizer("Hello", add_special_tokens=False)["input_ids"]  # cycles the prompts
    assert [row["rollout_pool/weight_version"] for row in logs] == [1.0, 2.0]
    assert all(row["weight_sync_s"] > 0 for row in logs)
