"""Which completion bodies the gateway turns into pool requests (so they pack), and the answers it builds (pure)."""

from __future__ import annotations

import json
import math

import pytest

from rollout_plugin.gateway.native import completion_response, plan_completion
from rollout_plugin.types import Result, Sample, SamplingParams

BASE = {"model": "m", "prompt": "hi", "max_tokens": 8, "temperature": 0.7, "top_p": 0.9}


def test_a_modelled_body_becomes_one_request_per_prompt_with_its_sampling():
    plan = plan_completion({**BASE, "prompt": ["a", [1, 2, 3]], "n": 2, "top_k": 5, "min_tokens": 1, "seed": 7,
                            "stop": "\n", "ignore_eos": True, "return_token_ids": True}, max_n=16)
    assert plan is not None and plan.token_ids and not plan.logprobs
    requests = plan.requests()
    assert [r.prompt for r in requests] == ["a", [1, 2, 3]] and [r.kind for r in requests] == ["text", "tokens"]
    assert all(r.n == 2 and not r.metadata for r in requests) and len({r.id for r in requests}) == 2
    assert requests[0].sampling == SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, min_tokens=1,
                                                  seed=7, stop=("\n",), ignore_eos=True)


@pytest.mark.parametrize("change", [
    {"presence_penalty": 0.5},  # a parameter the pool does not model
    {"stream": True},
    {"temperature": None}, {"max_tokens": None},  # the engine would fill them from the model's generation config
    {"top_p": None},  # ... top_p too, unless the call is greedy
    {"logprobs": 1, "return_tokens_as_token_ids": True},  # top-k logprobs: the pool keeps the sampled token's only
    {"logprobs": 0},  # token strings: the gateway has no tokenizer
    {"prompt": []}, {"prompt": [[]]}, {"prompt": [1, "a"]}, {"prompt": {"x": 1}},
    {"n": 17}, {"n": 0}, {"n": 2.0}, {"max_tokens": True}, {"stop": [1]}, {"ignore_eos": "yes"},
])
def test_anything_else_passes_through(change):
    assert plan_completion({**BASE, **change}, max_n=16) is None


def test_greedy_needs_no_top_p_and_an_explicit_top_k_of_minus_one_stays_explicit():
    body = {k: v for k, v in BASE.items() if k != "top_p"}
    plan = plan_completion({**body, "temperature": 0, "top_k": -1}, max_n=4)
    assert plan is not None and plan.sampling.temperature == 0.0 and plan.sampling.top_k == 0  # sent; vLLM: no top-k
    assert plan_completion({**BASE, "logprobs": 0, "return_tokens_as_token_ids": True}, max_n=4).logprobs


def test_the_answer_is_shaped_as_vllm_numbers_and_counts_it():
    plan = plan_completion({**BASE, "prompt": ["ab", [5, 6]], "n": 2, "return_token_ids": True, "logprobs": 0,
                            "return_tokens_as_token_ids": True}, max_n=4)
    results = [Result("r0", (Sample("x", (1, 2), (-0.5, math.nan), "length"), Sample("y", (3,), (-1.0,), "stop")),
                      prompt_tokens=2),
               Result("r1", (Sample("z", (4,), (-2.0,), "length"), Sample("w", (9, 9), (-0.1, -0.2), "length")),
                      prompt_tokens=2)]
    answer = completion_response(plan, results, [(7, 8), None], model="served", created=11)
    json.dumps(answer, allow_nan=False)  # what Starlette's JSONResponse requires
    assert answer["object"] == "text_completion" and answer["model"] == "served" and answer["created"] == 11
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in answer["choices"]] == ["x", "y", "z", "w"]
    assert [c["prompt_token_ids"] for c in answer["choices"]] == [[7, 8], [7, 8], [5, 6], [5, 6]]
    assert answer["choices"][3]["token_ids"] == [9, 9] and answer["choices"][1]["finish_reason"] == "stop"
    assert answer["choices"][0]["logprobs"] == {
        "text_offset": [0, 10], "token_logprobs": [-0.5, None], "tokens": ["token_id:1", "token_id:2"],
        "top_logprobs": [{"token_id:1": -0.5}, None]}
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10,
                               "prompt_tokens_details": None}


def test_without_return_token_ids_choices_carry_no_ids():
    plan = plan_completion(BASE, max_n=1)
    answer = completion_response(plan, [Result("r", (Sample("x", (1,), None, "length"),), prompt_tokens=1)], [(3,)],
                                 model="m", created=0)
    choice = answer["choices"][0]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None and choice["logprobs"] is None
