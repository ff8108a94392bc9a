"""The gateway on the session's real vLLM engine, through the openai client: completions and chat, streamed and not;
packed callers' answers identical to what the engine gives each body alone; a streaming caller that hangs up makes the
engine abort its request. In-process (tests/gateway_harness.py), attached to the engine as `serve engine.urls=...`
is."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import openai
import pytest

from engine_fixtures import engine_counter
from gateway_harness import eventually, running_gateway
from rollout_plugin.config.schema import EngineConfig, PoolConfig
from rollout_plugin.gateway.app import Gateway
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.pool.api.pool import RolloutPool

pytestmark = pytest.mark.engine

PROMPT = "The quick brown fox"


@contextlib.asynccontextmanager
async def live_gateway(live_engine, **pool_kw):
    relay = Relay()
    engine = EngineConfig(urls=[live_engine.url], api_key=live_engine.api_key, max_model_len=1024,
                          served_model_name=live_engine.model_dir)
    async with RolloutPool(engine, PoolConfig(**pool_kw),
                           client_factory=functools.partial(PassThroughClient, relay=relay)) as pool:
        gw = Gateway(pool, relay, model="tiny", max_model_len=1024, api_key=None, world_size=1)
        async with running_gateway(gw) as url, openai.AsyncOpenAI(base_url=url + "/v1", api_key="none",
                                                                  max_retries=0) as client:
            yield client, pool, relay


def settled(pool: RolloutPool, relay: Relay) -> bool:
    stats = pool.stats()
    return stats.samples_inflight == 0 and stats.groups_inflight == 0 and not relay.exchanges


async def test_completions_and_chat_streamed_and_not(live_engine):
    async with live_gateway(live_engine) as (client, pool, relay):
        kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0,
              "extra_body": {"ignore_eos": True}}
        whole = await client.completions.create(**kw)
        stream = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert len([c for c in chunks if c.choices]) > 1  # it came in pieces
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
        messages = [{"role": "user", "content": "Hi"}]
        chat = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.0)
        pieces = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.0,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in pieces if c.choices])
        assert text == chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
        await eventually(lambda: settled(pool, relay))
        assert pool.stats().requests_done == 4


EXTRA = {"ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True}
GREEDY = {"model": "tiny", "max_tokens": 6, "temperature": 0.0, "logprobs": 0}
COMPLETIONS = 'http_requests_total{handler="/v1/completions"'


async def test_a_pool_built_answer_is_the_one_the_engine_gives_the_body_itself(live_engine):
    async with live_gateway(live_engine) as (client, pool, relay):
        calls = await engine_counter(live_engine, COMPLETIONS)
        mine = await client.completions.create(**GREEDY, prompt=PROMPT, extra_body=EXTRA)
        # presence_penalty=0 changes nothing but is not modelled: this body goes to the engine as sent
        theirs = await client.completions.create(**GREEDY, prompt=PROMPT, extra_body={**EXTRA, "presence_penalty": 0})
        assert await engine_counter(live_engine, COMPLETIONS) == calls + 2
        keys = ("index", "text", "finish_reason", "token_ids", "prompt_token_ids", "logprobs")
        assert [{k: c.model_dump()[k] for k in keys} for c in mine.choices] == [
            {k: c.model_dump()[k] for k in keys} for c in theirs.choices]
        assert mine.usage == theirs.usage
        await eventually(lambda: settled(pool, relay))


async def test_concurrent_callers_reach_the_engine_as_one_call(live_engine):
    callers = 6
    async with live_gateway(live_engine, pack_timeout_s=10.0, pack_size=callers) as (client, pool, relay):
        prompts = [f"{PROMPT} {i}" for i in range(callers)]
        calls = await engine_counter(live_engine, COMPLETIONS)
        packed = await asyncio.gather(*(client.completions.create(**GREEDY, prompt=p, extra_body=EXTRA)
                                        for p in prompts))
        assert await engine_counter(live_engine, COMPLETIONS) == calls + 1
        # Each caller's own prompt, as the engine tokenizes it alone (a batch changes no tokenization), and its
        # own samples (greedy sampling of a random model may differ in a batch: only the shape is compared).
        alone = {**GREEDY, "max_tokens": 1, "extra_body": {**EXTRA, "presence_penalty": 0}}  # passes through: no wait
        tokenized = [(await client.completions.create(**alone, prompt=p)).choices[0].model_extra["prompt_token_ids"]
                     for p in prompts[:2]]
        assert [a.choices[0].model_extra["prompt_token_ids"] for a in packed[:2]] == tokenized
        for answer in packed:
            (choice,) = answer.choices
            ids = choice.model_extra["token_ids"]
            assert len(ids) == 6 and choice.logprobs.tokens == [f"token_id:{t}" for t in ids]
            assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens == len(
                choice.model_extra["prompt_token_ids"])
        await eventually(lambda: settled(pool, relay))


async def test_a_streaming_caller_that_hangs_up_frees_its_slot_and_the_engine_aborts(live_engine, caplog):
    samples, budget = 16, 1000  # 16,000 tokens: the engine is still generating when the caller hangs up
    caplog.set_level(logging.INFO, logger="rollout_plugin.gateway.streaming")
    loop = asyncio.get_running_loop()
    outcomes = []
    async with live_gateway(live_engine) as (client, pool, relay):
        for _attempt in range(3):
            finished = await engine_counter(live_engine, 'vllm:request_success_total{.*finished_reason="length"')
            tokens = await engine_counter(live_engine, "vllm:generation_tokens_total")
            done = pool.stats().requests_done
            stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=budget, n=samples,
                                                     temperature=1.0, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                assert chunk.choices
                break
            caplog.clear()
            await stream.close()
            await eventually(lambda: settled(pool, relay))
            left = any("left mid-stream" in r.getMessage() for r in caplog.records)
            if left:  # the gateway saw the hang-up before the answer's end: the request is dropped, not done
                assert pool.stats().requests_done == done
            deadline = loop.time() + 30
            while await engine_counter(live_engine, "vllm:num_requests_running") > 0:
                assert loop.time() < deadline, "the engine still runs the request"
                await asyncio.sleep(0.05)  # polling the engine's gauge with a deadline
            aborted = (await engine_counter(live_engine, 'vllm:request_success_total{.*finished_reason="length"')
                       == finished and await engine_counter(live_engine, "vllm:generation_tokens_total") - tokens
                       < samples * budget)
            outcomes.append((left, aborted))
            # On a loaded machine vLLM's API process can fall so far behind its engine core that the answer is
            # complete (at the gateway, or in the engine) before the hang-up gets there; then try again.
            if left and aborted:
                break
        else:
            pytest.fail(f"the engine never aborted a hung-up stream: (gateway saw it, engine aborted) = {outcomes}")
