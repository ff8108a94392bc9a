"""Agentic sessions through the gateway (issue 23): ``X-Session-ID`` becomes the pool's affinity key, so a session's
turns never share an engine call with another session's and go to its home engine; ``X-Session-End`` and
``DELETE /sessions/{id}`` free the home. Over the scripted echo engines of tests/gateway_harness.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque

import httpx
import pytest

from gateway_harness import EchoEngine, eventually, running_gateway
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.gateway.app import Gateway
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.gateway.sessions import Session, SessionHeaderError, read_session, session_key
from rollout_plugin.pool.api.pool import RolloutPool

SESSIONS = 4
# A body the gateway can model (max_tokens, temperature): without a session header it packs with other callers'.
TURN = {"model": "echo", "max_tokens": 4, "temperature": 0.0}


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
    return stats.samples_inflight == 0 and stats.queued == 0 and not relay.exchanges


def prompts_of(body: dict) -> list:
    prompt = body["prompt"]
    return prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]


# ---------------------------------------------------------------------------------------------- headers (pure)


def test_the_session_header_is_read_in_any_case_and_in_rays_spelling():
    assert read_session({}) is None and read_session({"content-type": "application/json"}) is None
    assert read_session({"X-Session-ID": "s1"}) == Session("s1")
    assert read_session({"x-session-id": "s1", "X-SESSION-END": "TRUE"}) == Session("s1", end=True)
    assert read_session({"x_session_id": "s1", "x-session-end": "1"}) == Session("s1", end=True)
    assert read_session({"X-Session-ID": "s1", "x_session_id": "s1", "X-Session-End": "0"}) == Session("s1")
    # Its own prefix: a caller's id never lands on the verl router's "session:<id>" or a "group:<hash>" key.
    assert session_key("s1") == "gateway-session:s1" and not session_key("x").startswith(("session:", "group:"))


@pytest.mark.parametrize("headers", [
    {"X-Session-ID": ""}, {"X-Session-ID": "a", "x_session_id": "b"},
    {"X-Session-End": "true"},  # which session?
    {"X-Session-ID": "a", "X-Session-End": "yes"},
])
def test_a_session_header_the_gateway_cannot_read_is_refused(headers):
    with pytest.raises(SessionHeaderError):
        read_session(headers)


# ---------------------------------------------------------------------------------------------- through the gateway


async def test_concurrent_turns_of_different_sessions_never_share_an_engine_call():
    # Today's code packed these SESSIONS turns into one 4-prompt call (pack_size fills, the pack goes).
    async with gateway(pack_size=SESSIONS, pack_timeout_s=10.0) as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(*(http.post(url + "/v1/completions", json={**TURN, "prompt": f"s{i}"},
                                                       headers={"X-Session-ID": f"session-{i}"})
                                             for i in range(SESSIONS)))
        assert [a.json()["choices"][0]["text"] for a in answers] == [f"s{i}/0" for i in range(SESSIONS)]
        assert sorted(str(prompts_of(body)) for _, _, body in calls) == [f"['s{i}']" for i in range(SESSIONS)]
        await eventually(lambda: settled(pool, relay))


async def test_requests_without_the_header_still_pack_beside_session_turns():
    async with gateway(pack_size=2, pack_timeout_s=10.0) as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(
                http.post(url + "/v1/completions", json={**TURN, "prompt": "plain0"}),
                http.post(url + "/v1/completions", json={**TURN, "prompt": ["mine0", "mine1"]},
                          headers={"X-Session-ID": "mine"}),
                http.post(url + "/v1/completions", json={**TURN, "prompt": "plain1"}))
        assert [[c["text"] for c in a.json()["choices"]] for a in answers] == [
            ["plain0/0"], ["mine0/0", "mine1/0"], ["plain1/0"]]
        # The callers without a session packed as before; the session's body went as sent, in one call of its own.
        assert sorted(str(prompts_of(body)) for _, _, body in calls) == ["['mine0', 'mine1']", "['plain0', 'plain1']"]


async def test_a_sessions_turns_go_to_its_home_whatever_the_route_or_header_spelling():
    async with gateway(engines=2, script=["hold"]) as (url, pool, relay, calls, fakes):
        async with httpx.AsyncClient(timeout=30) as http:
            # Another session's turn holds engine0, so this session's first turn makes engine1 its home.
            other = asyncio.create_task(http.post(url + "/v1/completions", json={**TURN, "prompt": "other"},
                                                  headers={"X-Session-ID": "other"}))
            await asyncio.wait_for(fakes[0].held.wait(), 30)
            first = await http.post(url + "/v1/completions", json={**TURN, "prompt": "t0"},
                                    headers={"X-Session-ID": "agent"})
            assert first.status_code == 200 and calls[-1][0] == "engine1"
            other.cancel()  # engine0 is idle again: least-loaded routing would now pick it (ties go to engine0)
            with contextlib.suppress(asyncio.CancelledError):
                await other
            await asyncio.wait_for(fakes[0].released.wait(), 30)
            await eventually(lambda: settled(pool, relay))
            chat = {"model": "echo", "messages": [{"role": "user", "content": "t"}], "max_tokens": 4}
            turns = [("/v1/completions", {**TURN, "prompt": "t1"}, {"x-session-id": "agent"}),
                     ("/v1/chat/completions", chat, {"x_session_id": "agent"}),
                     ("/v1/completions", {**TURN, "prompt": "t3", "stream": True}, {"X-SESSION-ID": "agent"}),
                     ("/v1/chat/completions", {**chat, "stream": True}, {"X-Session-ID": "agent"})]
            for path, body, headers in turns:
                answer = await http.post(url + path, json=body, headers=headers)
                assert answer.status_code == 200, answer.text
        agent = [engine for engine, _, body in calls if body.get("prompt") != "other"]
        assert agent == ["engine1"] * 5
        assert pool.affinity_keys == 2  # "agent" and "other"


async def test_the_end_header_and_the_route_free_a_sessions_home():
    async with gateway(engines=2) as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=30) as http:
            for session in ("a", "b", "c"):
                turn = await http.post(url + "/v1/completions", json={**TURN, "prompt": session},
                                       headers={"X-Session-ID": session})
                assert turn.status_code == 200
            assert pool.affinity_keys == 3
            last = await http.post(url + "/v1/completions", json={**TURN, "prompt": "a2"},
                                   headers={"X-Session-ID": "a", "X-Session-End": "true"})
            assert last.json()["choices"][0]["text"] == "a2/0" and pool.affinity_keys == 2  # freed once answered
            async with http.stream("POST", url + "/v1/chat/completions", headers={
                    "X-Session-ID": "b", "X-Session-End": "1"}, json={
                    "model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                    "stream": True}) as stream:
                text = (await stream.aread()).decode()
            assert text.rstrip().endswith("data: [DONE]")
            await eventually(lambda: pool.affinity_keys == 1)  # a stream's turn is over when the pool resolves it
            ended = await http.delete(url + "/sessions/c")
            assert ended.status_code == 200 and ended.json() == {"session": "c", "ended": True}
            assert pool.affinity_keys == 0
            again = await http.delete(url + "/sessions/c")
            assert again.json() == {"session": "c", "ended": False}  # nothing left to free


async def test_unreadable_session_headers_are_answered_400_before_anything_is_sent():
    async with gateway() as (url, pool, relay, calls, _):
        async with httpx.AsyncClient(timeout=30) as http:
            answers = [await http.post(url + "/v1/completions", json={**TURN, "prompt": "x"}, headers=headers)
                       for headers in ({"X-Session-ID": "a", "X-Session-End": "maybe"}, {"X-Session-End": "true"})]
            chat = await http.post(url + "/v1/chat/completions", headers={"X-Session-ID": ""},
                                   json={"model": "echo", "messages": [], "stream": True})
        assert [a.status_code for a in [*answers, chat]] == [400, 400, 400]
        assert "X-Session-End" in json.loads(answers[0].text)["error"]["message"] and calls == []
