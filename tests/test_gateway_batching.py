"""The gateway's split/merge of multi-prompt completion bodies (pure)."""

from __future__ import annotations

from rollout_plugin.gateway.batching import merge_completions, prompt_count, split_prompts


def test_prompt_count_of_each_prompt_shape():
    assert prompt_count("hi") == 1
    assert prompt_count([1, 2, 3]) == 1  # one token-id prompt
    assert prompt_count(["a", "b"]) == 2
    assert prompt_count([[1, 2], [3]]) == 2


def test_split_then_merge_keeps_vllm_prompt_major_order():
    body = {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 4}
    parts = split_prompts(body)
    assert [p["prompt"] for p in parts] == ["a", "b", "c"] and all(p["n"] == 2 for p in parts)
    answers = [{"id": f"cmpl-{i}", "object": "text_completion", "model": "m",
                "choices": [{"index": j, "text": f"{p['prompt']}{j}"} for j in (1, 0)],  # out of order
                "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}}
               for i, p in enumerate(parts)]
    merged = merge_completions(answers, n=2)
    assert [c["text"] for c in merged["choices"]] == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert [c["index"] for c in merged["choices"]] == list(range(6))
    assert merged["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    assert merged["id"] == "cmpl-0"


def test_single_prompt_bodies_pass_through():
    body = {"prompt": "a"}
    assert split_prompts(body) == [body]
    assert merge_completions([{"x": 1}], n=1) == {"x": 1}
