"""In-stream errors and cut streams are verdicts, read by one SSE parser; chat streams continue from their
top-level prompt ids; the prefix cache is salted by weight version.

Servers: tests/vllm_shaped_server.py (and tests/fault_server.py), which copy vLLM 0.32's stream shapes (an error
event then ``[DONE]`` under HTTP 200 when a generation fails once its stream began; chat's top-level
``prompt_token_ids``), through the client, the pool and the gateway; tests/vllm_like.py on virtual time for the
cache salt across a ``keep`` weight update.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from fault_server import FaultServer
from gateway_harness import running_gateway
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, EngineConfig, PoolConfig, PrewarmConfig
from rollout_plugin.gateway.app import Gateway
from rollout_plugin.gateway.relay import PassThroughClient, Relay, StreamCut, gateway_request
from rollout_plugin.pool.transport.http import HttpEngineClient
from rollout_plugin.pool.core.engine_client import CallError, RateLimited, Rejected, Unavailable, new_progress
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.transport.sse import Chunk, Done, StreamedAnswer, StreamError, parse_event
from rollout_plugin.pool.weights.sources import FolderWeights
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request, SamplingParams
from vllm_like import VllmLike
from vllm_shaped_server import CHAT_PROMPT_IDS, TEXT_PROMPT_IDS, ShapedServer, StreamFault, serve

TOKENS = 8
CHAT = [{"role": "user", "content": "hi"}]
ENGINE_DEAD = StreamFault(after=3)  # vLLM: EngineDeadError inside the stream -> 500 InternalServerError
FAULTS = {
    "nested-500": (ENGINE_DEAD, Unavailable),
    "flat-500": (StreamFault(after=3, flat=True), Unavailable),
    "retryable-503": (StreamFault(after=3, code=503, kind="ServiceUnavailableError"), Unavailable),
    "bad-request-400": (StreamFault(after=3, code=400, kind="BadRequestError", message="bad"), Rejected),
    "no-finish-reason": (StreamFault(after=3, silent=True), Unavailable),
}


def client(url: str, cls=HttpEngineClient, **kw) -> HttpEngineClient:
    return cls("e0", url, api_key=None, model="shaped", max_connections=8, connect_s=5, request_s=5,
               admission_s=5, health_s=5, **kw)


def reqs(count: int = 4, n: int = 1, prompt=None) -> list[Request]:
    return [Request(f"r{i}", prompt if prompt is not None else f"p{i}", n=n,
                    sampling=SamplingParams(max_tokens=TOKENS)) for i in range(count)]


# -- the parser ------------------------------------------------------------------------------------------------

def test_events_are_typed_and_an_error_without_choices_is_one_in_either_shape():
    assert parse_event(" [DONE] ") == Done()
    nested = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "param": None,
                        "code": 500}}
    assert parse_event(json.dumps(nested)) == StreamError(500, "EngineCore encountered an issue.",
                                                          "InternalServerError")
    flat = {"object": "error", "message": "boom", "type": "BadRequestError", "code": 400}
    assert parse_event(json.dumps(flat)) == StreamError(400, "boom", "BadRequestError")
    assert parse_event('{"error": "plain"}') == StreamError(None, "plain")
    assert parse_event('{"error": {"message": "m", "code": "rate_limit_exceeded"}}').status is None
    chunk = parse_event(json.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}], "prompt_token_ids": [7]}))
    assert isinstance(chunk, Chunk) and chunk.prompt_token_ids == [7]
    with pytest.raises(ValueError):
        parse_event("[1, 2]")


@pytest.mark.parametrize("code, verdict", [(500, Unavailable), (503, Unavailable), (None, Unavailable),
                                           (400, Rejected), (422, Rejected), (429, RateLimited)])
def test_an_error_event_is_a_verdict_by_its_status_as_an_http_answer_would_be(code, verdict):
    answer = StreamedAnswer()
    answer.add(json.dumps({"choices": [{"index": 0, "text": "a", "token_ids": [1, 2]}]}))
    answer.add(json.dumps({"error": {"message": "x", "type": "T", "code": code}}))
    answer.add("[DONE]")
    got = answer.verdict("e0")
    assert type(got) is verdict and got.status == code
    assert answer.choices[0]["token_ids"] == [1, 2]  # what streamed before the error stays


def test_a_stream_whole_only_when_every_choice_has_a_finish_reason():
    answer = StreamedAnswer()
    answer.add(json.dumps({"choices": [{"index": 0, "text": "a", "finish_reason": "stop"},
                                       {"index": 1, "text": "b"}]}))
    answer.add("[DONE]")
    assert isinstance(answer.verdict("e0"), Unavailable) and answer.unfinished() == [1]
    answer.add(json.dumps({"choices": [{"index": 1, "text": "c", "finish_reason": "length"}]}))
    assert answer.verdict("e0") is None


# -- the client ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
async def test_a_mid_stream_failure_is_a_verdict_and_progress_keeps_the_tokens_streamed_before_it(fault):
    spec, verdict = FAULTS[fault]
    server = ShapedServer(tokens=TOKENS)
    server.faults.append(spec)
    async with serve(server) as url:
        c = client(url, stream=True)
        batch = reqs(2, n=2)
        progress = new_progress(batch)
        try:
            with pytest.raises(CallError) as info:
                await c.generate(batch, progress)
        finally:
            await c.aclose()
    assert type(info.value) is verdict
    assert all(p.token_ids == [0, 1, 2] and p.prompt_token_ids == TEXT_PROMPT_IDS and p.finish_reason is None
               for parts in progress for p in parts)


async def test_chat_streams_report_the_top_level_prompt_ids_a_cut_sample_continues_from():
    server = ShapedServer(tokens=TOKENS)
    server.faults.append(ENGINE_DEAD)
    async with serve(server) as url:
        c = client(url, stream=True)
        batch = [Request("c", CHAT, n=2, sampling=SamplingParams(max_tokens=TOKENS))]
        progress = new_progress(batch)
        try:
            with pytest.raises(Unavailable):
                await c.generate(batch, progress)
            whole = await c.generate(batch)  # streamed, no fault
            c.stream = False
            plain = await c.generate(batch)  # JSON: vLLM puts them at the top level there too
        finally:
            await c.aclose()
    assert [(p.prompt_token_ids, p.token_ids) for p in progress[0]] == [(CHAT_PROMPT_IDS, [0, 1, 2])] * 2
    for gen in (whole[0], plain[0]):
        assert gen.prompt_ids == tuple(CHAT_PROMPT_IDS) and gen.prompt_tokens == len(CHAT_PROMPT_IDS)
        assert all(s.token_ids == tuple(range(TOKENS)) and s.finish_reason == "length" for s in gen.samples)


# -- the pool: the verified case of issue 19 -------------------------------------------------------------------

@contextlib.asynccontextmanager
async def streamed_pool(servers: list[ShapedServer]):
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve(s)) for s in servers]
        cfg = PoolConfig(stream=True, per_engine=16, backoff_base_s=0.01, prewarm=PrewarmConfig(requests=0))
        yield await stack.enter_async_context(RolloutPool(EngineConfig(urls=urls, served_model_name="shaped"), cfg,
                                                          ControllerConfig(mode=ControllerMode.off)))


@pytest.mark.parametrize("engines", [1, 2])
async def test_samples_cut_by_an_in_stream_error_continue_and_end_whole(engines):
    """Issue 19's verified case: the engine errors mid-generation inside the stream. Before: 4 of 4 results ok,
    3 of 8 tokens each, finish reason None. Now each sample continues from its 3 tokens (on the same engine or
    the other) and ends whole."""
    servers = [ShapedServer(tokens=TOKENS) for _ in range(engines)]
    for s in servers:
        s.faults.append(ENGINE_DEAD)  # whichever engine gets the first call fails it mid-stream
    async with streamed_pool(servers) as pool:
        results = await asyncio.wait_for(pool.generate(reqs(4)), 30)
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(s.token_ids == tuple(range(TOKENS)) and s.finish_reason == "length"
               for r in results for s in r.samples)
    prompts = [p for s in servers for b in s.bodies for p in b["prompt"]]
    continued = [p for p in prompts if isinstance(p, list)]
    assert len(prompts) - len(continued) == 4  # no sample started over
    # Each went on from the tokens it streamed (with two engines, cut again after 3 more on the other one).
    assert len(continued) >= 4 and all(p[:6] == [*TEXT_PROMPT_IDS, 0, 1, 2] for p in continued)


async def test_a_chat_sample_cut_mid_stream_continues_from_its_top_level_prompt_ids():
    server = ShapedServer(tokens=TOKENS)
    server.faults.append(ENGINE_DEAD)
    async with streamed_pool([server]) as pool:
        [result] = await asyncio.wait_for(pool.generate([Request("c", CHAT, n=2,
                                                                 sampling=SamplingParams(max_tokens=TOKENS))]), 30)
    assert result.ok and [s.token_ids for s in result.samples] == [tuple(range(TOKENS))] * 2
    continued = [p for b in server.bodies for p in b.get("prompt", ())]
    assert continued == [[*CHAT_PROMPT_IDS, 0, 1, 2]] * 2  # each sample on its own, from the chat's prompt ids


async def test_a_bad_request_inside_the_stream_ends_as_an_error_record_never_ok_and_cut():
    server = ShapedServer(tokens=TOKENS)
    server.faults.extend([FAULTS["bad-request-400"][0]] * 5)  # the packed call, then each request alone
    async with streamed_pool([server]) as pool:
        results = await asyncio.wait_for(pool.generate(reqs(4)), 30)
    assert all(not r.ok and "status 400" in (r.error or "") for r in results)


# -- the gateway's relay reads streams with the same parser -----------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
async def test_the_relay_and_the_client_reach_the_same_verdict_on_the_same_stream(fault):
    spec, verdict = FAULTS[fault]
    server = ShapedServer(tokens=TOKENS)
    server.faults.extend([spec, spec])
    relay = Relay()
    body = {"prompt": ["a", "b"], "n": 2, "max_tokens": TOKENS, "stream": True, "return_token_ids": True}
    async with serve(server) as url:
        own = client(url, stream=True)
        passing = client(url, PassThroughClient, relay=relay)
        try:
            with pytest.raises(CallError) as direct:
                await own.generate(reqs(2, n=2))
            r = gateway_request("completions", body, samples=4, max_samples=8, stream=True)
            ex = relay.open(r.id, stream=True)
            with pytest.raises(StreamCut) as relayed:
                await passing.generate([r])
        finally:
            await own.aclose()
            await passing.aclose()
    assert type(direct.value) is verdict
    assert str(relayed.value) == str(direct.value) and relayed.value.status == (direct.value.status or 502)
    assert ex.done and ex.events is not None and not ex.events.empty()  # the caller got the stream as it was


# -- the prefix cache, salted by weight version ----------------------------------------------------------------

async def test_each_call_carries_a_cache_salt_of_its_weight_version():
    server = ShapedServer()
    relay = Relay()
    async with serve(server) as url:
        c = client(url)
        passing = client(url, PassThroughClient, relay=relay)
        try:
            for version in (0, 1, 2, 2):
                await c.generate(reqs(1), weight_version=version)
            await c.generate(reqs(1))  # a caller that says nothing (pre-warm): no salt
            r = gateway_request("completions", {"prompt": "x", "max_tokens": 2}, samples=1, max_samples=8)
            relay.open(r.id)
            await passing.generate([r], weight_version=3)
            c.extra_body = {"cache_salt": "users-own"}
            await c.generate(reqs(1), weight_version=3)
        finally:
            await c.aclose()
            await passing.aclose()
    salts = [b.get("cache_salt") for b in server.bodies]
    assert salts[0] is None and salts[4] is None  # the initial weights: no salt (hosted APIs never see one)
    assert salts[1] != salts[2] == salts[3] and None not in (salts[1], salts[2], salts[5])
    assert salts[5].endswith("-v3") and salts[6] == "users-own"  # the user's own salt wins
    for salt in filter(None, salts):  # vLLM's validate_cache_salt: non-empty, <= 128 chars, none of @ / \ NUL
        assert 0 < len(salt) <= 128 and not set(salt) & {"@", "/", "\\", "\0"}


def test_after_a_keep_update_no_call_reuses_kv_computed_under_the_old_weights():
    """``keep`` freezes calls in the engines through the load, so vLLM's ``/reset_prefix_cache`` fails (their blocks
    are held) and the old weights' prefixes stay cached: only the salt keeps later calls off them."""
    async def main():
        es = [VllmLike(f"e{i}") for i in range(2)]
        for e in es:
            e.folders = {"w1": 1}
        loop = asyncio.get_running_loop()
        cfg = PoolConfig(per_engine=16, over_concurrency_ratio=1.0, pack_size=4)
        async with RolloutPool(pool=cfg, controller=ControllerConfig(mode=ControllerMode.off), clients=es,
                               clock=loop.time) as pool:
            batch = [Request(f"r{i}", [100 + i], n=2, sampling=SamplingParams(max_tokens=40)) for i in range(6)]
            first = asyncio.ensure_future(pool.generate(batch))
            await asyncio.sleep(0.2)  # 20 of 40 tokens in
            await pool.update_weights(1, FolderWeights("w1"), mode="keep")
            again = await pool.generate([Request(f"s{i}", [100 + i], sampling=SamplingParams(max_tokens=4))
                                         for i in range(6)])
            assert all(r.ok for r in await first + again)
        assert sum(e.stale_hits for e in es) == 0
        assert {v for e in es for v in e.salts} == {0, 1}  # the frozen calls kept theirs; later ones are salted
    run_virtual(main())


async def test_a_relayed_stream_whose_engine_fails_before_any_output_is_retried_not_cut():
    """vLLM adds a streamed request to the engine inside the stream: a refusal there (a full queue: 503; an engine
    core already dead: 500) is the stream's first and only event. Nothing reached the caller yet, so the gateway
    retries the call as after an HTTP error instead of forwarding the error and cutting the answer."""
    server = ShapedServer(tokens=TOKENS)
    server.faults.append(StreamFault(after=0, code=503, kind="ServiceUnavailableError",
                                     message="The engine is currently busy and cannot accept new requests."))
    relay = Relay()
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(server))
        cfg = PoolConfig(per_engine=8, backoff_base_s=0.01, prewarm=PrewarmConfig(requests=0))
        pool = await stack.enter_async_context(RolloutPool(
            pool=cfg, controller=ControllerConfig(mode=ControllerMode.off), clients=[client(url, PassThroughClient,
                                                                                            relay=relay)]))
        gw_url = await stack.enter_async_context(running_gateway(Gateway(
            pool, relay, model="shaped", max_model_len=512, api_key=None, world_size=1)))
        body = {"model": "shaped", "messages": CHAT, "n": 2, "max_tokens": TOKENS, "stream": True,
                "return_token_ids": True}
        async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", gw_url + "/v1/chat/completions",
                                                                      json=body) as resp:
            text = (await resp.aread()).decode()
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert resp.status_code == 200 and events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events), events  # the caller never saw the refused try
    answer = StreamedAnswer()
    for e in events:
        answer.add(e)
    assert answer.verdict("gateway") is None and answer.prompt_token_ids == CHAT_PROMPT_IDS
    assert [c["token_ids"] for c in answer.merged()] == [list(range(TOKENS))] * 2
    assert server.calls == 2


@pytest.mark.parametrize("script, ok", [(["ok"], True), (["error-event"], False)], ids=["whole", "error-event"])
async def test_the_fault_servers_streams_are_vllms_shape(script, ok):
    with FaultServer(script) as srv:
        c = client(srv.url, stream=True)
        batch = reqs(2, n=2)
        progress = new_progress(batch)
        try:
            if ok:
                gens = await c.generate(batch, progress)
                assert all(s.token_ids == (1, 2, 3) and s.finish_reason == "stop" for g in gens for s in g.samples)
            else:
                with pytest.raises(Unavailable, match="status 500"):
                    await c.generate(batch, progress)
                assert all(p.token_ids == [1] for parts in progress for p in parts)
        finally:
            await c.aclose()
