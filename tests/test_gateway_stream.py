"""The gateway's streams and packed callers over scripted echo engines (tests/gateway_harness.py), seen by the openai
client and raw HTTP: streams relayed event by event, failover before the first event, an error event when an engine dies
mid-stream, callers that hang up freeing their slots, concurrent callers' prompts packed into one engine call.
The same paths run against a real engine in test_gateway_openai.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque

import httpx
import openai
import pytest

from gateway_harness import EchoEngine, eventually, running_gateway
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.gateway.app import Gateway
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.pool.api.pool import RolloutPool

CALLERS = 8


@contextlib.asynccontextmanager
async def gateway(engines: int = 1, script: list[str] | None = None, **pool_kw):
    """(URL, pool, relay, calls, engines) with ``engines`` echo engines sharing ``script``."""
    relay, calls, shared = Relay(), [], deque(script or [])
    fakes = [EchoEngine(f"engine{i}", shared, calls) for i in range(engines)]
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(f.serving()) for f in fakes]
        clients = [PassThroughClient(f"engine{i}", url, api_key=None, model="echo", max_connections=8, connect_s=5,
                                     request_s=5, admission_s=5, health_s=5, relay=relay)
                   for i, url in enumerate(urls)]
        cfg = PoolConfig(**{"per_engine": 8, "backoff_base_s": 0.01, **pool_kw})
        pool = await stack.enter_async_context(RolloutPool(
            pool=cfg, controller=ControllerConfig(mode=ControllerMode.off), clients=clients))
        gw = Gateway(pool, relay, model="echo", max_model_len=512, api_key=None, world_size=engines)
        url = await stack.enter_async_context(running_gateway(gw))
        yield url, pool, relay, calls, fakes


def settled(pool: RolloutPool, relay: Relay) -> bool:
    stats = pool.stats()
    return stats.samples_inflight == 0 and stats.groups_inflight == 0 and stats.queued == 0 and not relay.exchanges


async def sse_events(url: str, path: str, body: dict) -> list[str]:
    """The data of every event of a streamed answer, read raw."""
    async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", url + path, json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.aread()).decode()
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block]


async def test_streams_reach_the_openai_client_event_by_event_with_usage_last():
    async with gateway() as (url, pool, relay, calls, _):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = await client.completions.create(model="echo", prompt=["a", "b"], n=2, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        texts: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
        assert texts == {0: "a/0", 1: "a/1", 2: "b/0", 3: "b/1"}
        assert len(chunks) == 9 and chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
        chat = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=4, stream=True)
        assert "".join([c.choices[0].delta.content async for c in chat if c.choices]) == "reply/0"
        assert [(path, body["stream"]) for _, path, body in calls] == [("/v1/completions", True),
                                                                       ("/v1/chat/completions", True)]
        assert calls[0][2]["model"] == "echo" and calls[0][2]["prompt"] == ["a", "b"]  # one call, as sent
        await eventually(lambda: settled(pool, relay))
        assert pool.stats().requests_done == 2


async def test_a_failure_before_the_first_event_fails_over_unseen():
    async with gateway(engines=2, script=["500"]) as (url, pool, relay, calls, _):
        events = await sse_events(url, "/v1/completions", {"model": "m", "prompt": "a", "stream": True})
        assert events[-1] == "[DONE]" and "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "a/0"
        assert len(calls) == 2 and calls[0][0] != calls[1][0]  # failed on one engine, answered by the other
        await eventually(lambda: settled(pool, relay))


async def test_an_engine_dying_mid_stream_ends_it_with_an_error_event_and_no_retry():
    async with gateway(engines=2, script=["die:1", "die:1"]) as (url, pool, relay, calls, _):
        events = await sse_events(url, "/v1/completions", {"model": "m", "prompt": "a", "stream": True})
        assert json.loads(events[0])["choices"][0]["text"] == "a"
        assert "error" in json.loads(events[1]) and json.loads(events[1])["error"]["code"] == 502
        assert events[2:] == ["[DONE]"]
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = await client.completions.create(model="m", prompt="b", max_tokens=4, stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="stream"):
            async for chunk in stream:
                seen.append(chunk.choices[0].text)
        assert seen == ["b"]
        assert len(calls) == 2  # each stream was sent once: never started again after its first event
        await eventually(lambda: settled(pool, relay))
        assert pool.stats().requests_failed == 2


async def test_a_stream_the_pool_cannot_start_is_an_ordinary_error():
    async with gateway(script=["500"] * 10, max_retries=1) as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(url + "/v1/chat/completions", json={"messages": [], "stream": True})
        assert resp.status_code == 502 and "2 attempt(s)" in resp.json()["error"]["message"]
        assert len(calls) == 2


@pytest.mark.parametrize("stream", [True, False])
async def test_a_caller_that_hangs_up_frees_its_engine_slot(stream):
    async with gateway(script=["hold"]) as (url, pool, relay, calls, (engine,)):
        body = {"model": "m", "prompt": "a", "stream": stream, "max_tokens": 4}
        async with httpx.AsyncClient(timeout=30) as http:
            if stream:
                async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                    first = await anext(resp.aiter_lines())
                    assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "a"
            else:  # hangs up while the engine works on it
                call = asyncio.create_task(http.post(url + "/v1/completions", json=body))
                await asyncio.wait_for(engine.held.wait(), 30)
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
        await asyncio.wait_for(engine.released.wait(), 30)  # the engine's connection closed: vLLM aborts there
        await eventually(lambda: settled(pool, relay))
        assert pool.stats().requests_done == 0 and len(calls) == 1


async def test_concurrent_callers_prompts_go_as_one_packed_call_and_each_gets_its_own_answer():
    # Text and token prompts never share a call (one prompt kind per call): two packs of CALLERS / 2.
    async with gateway(pack_size=CALLERS // 2, pack_timeout_s=10.0) as (url, pool, relay, calls, _):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        prompts = [f"p{i}" if i % 2 else [i, i + 1] for i in range(CALLERS)]
        answers = await asyncio.gather(*(client.completions.create(
            model="m", prompt=p, max_tokens=4, temperature=0.0, extra_body={"return_token_ids": True})
            for p in prompts))
        completions = [body for _, path, body in calls if path == "/v1/completions"]
        assert sorted(len(body["prompt"]) for body in completions) == [CALLERS // 2] * 2  # not a call per caller
        for prompt, answer in zip(prompts, answers):
            (choice,) = answer.choices
            name = prompt if isinstance(prompt, str) else f"{prompt[0]}.{prompt[1]}"
            ids = [ord(c) for c in prompt] if isinstance(prompt, str) else prompt
            assert choice.text == f"{name}/0" and choice.finish_reason == "length"
            assert choice.model_extra["token_ids"] == [len(ids), 0] and choice.model_extra["prompt_token_ids"] == ids
            assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 2
        await eventually(lambda: settled(pool, relay))


async def test_bodies_the_pool_does_not_model_pass_through_alone():
    async with gateway(pack_timeout_s=10.0, pack_size=2) as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=30) as http:
            plain = {"model": "m", "max_tokens": 4, "temperature": 0.5, "top_p": 1.0}
            answers = await asyncio.gather(
                http.post(url + "/v1/completions", json={**plain, "prompt": "a", "presence_penalty": 0.5}),
                http.post(url + "/v1/completions", json={**plain, "prompt": ["b", "c"]}))
        assert [r.status_code for r in answers] == [200, 200]
        assert [c["text"] for c in answers[1].json()["choices"]] == ["b/0", "c/0"]
        bodies = sorted((str(body.get("prompt")), "presence_penalty" in body) for _, _, body in calls)
        assert bodies == [("['b', 'c']", False), ("a", True)]  # the modelled prompts packed; the other went as sent


async def test_a_pack_that_does_not_fill_goes_when_its_timeout_ends_round_after_round():
    async with gateway(pack_size=64, pack_timeout_s=0.05) as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=10) as http:  # a pack held for ever fails here, not at the suite's timeout
            for round_ in range(3):
                answers = await asyncio.gather(*(http.post(url + "/v1/completions", json={
                    "prompt": f"r{round_}.{i}", "max_tokens": 4, "temperature": 0.0}) for i in range(3)))
                assert [a.json()["choices"][0]["text"] for a in answers] == [f"r{round_}.{i}/0" for i in range(3)]
        assert len(calls) < 9  # packed, though never filled
