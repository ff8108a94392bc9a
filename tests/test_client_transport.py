"""The engine client's transport over real sockets: verdicts, SSE from raw chunks, keep-alive, no hidden queue.

Servers: tests/vllm_shaped_server.py (in-process, answers at once or holds calls) and tests/fault_server.py
(misbehaves on cue). Policy must only ever see CallError verdicts, never the transport's exceptions.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import warnings
from collections.abc import Iterator

import pytest

from fault_server import FaultServer
from rollout_plugin.config.schema import (
    ControllerConfig,
    ControllerMode,
    EngineConfig,
    PoolConfig,
    PrewarmConfig,
    TimeoutConfig,
)
from rollout_plugin.pool.transport.http import HttpEngineClient
from rollout_plugin.pool.core.engine_client import CallError, Malformed, RateLimited, Rejected, TimedOut, Unavailable
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams
from vllm_shaped_server import STREAM_TAIL, Hold, ShapedServer, serve


def client(url: str, *, stream: bool = False, request_s: float = 5.0, max_connections: int = 64,
           admission_s: float = 5.0) -> HttpEngineClient:
    return HttpEngineClient("e0", url, api_key="k", model="shaped", max_connections=max_connections, connect_s=2,
                            request_s=request_s, admission_s=admission_s, health_s=2, stream=stream)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound but not listening: connections to it are refused, and nobody else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_packed_call_comes_back_per_request_over_one_kept_alive_connection(stream):
    server = ShapedServer()
    async with serve(server) as url:
        c = client(url, stream=stream)
        try:
            for _ in range(5):
                gens = await c.generate([Request(f"r{i}", f"p{i}", n=2, sampling=SamplingParams(max_tokens=3))
                                         for i in range(3)])
        finally:
            await c.aclose()
    tail = STREAM_TAIL if stream else ""
    want = [[f"answer {i}.{j}{tail}" for j in range(2)] for i in range(3)]
    assert [[s.text for s in g.samples] for g in gens] == want
    assert all(s.token_ids == (0, 1, 2) and s.finish_reason == "length" for g in gens for s in g.samples)
    assert [g.prompt_tokens for g in gens] == [3, 3, 3]
    # Keep-alive: five calls, one connection (a streamed reply is read past [DONE] so its connection is reused).
    assert server.calls == 5 and len(server.peers) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("fault, verdict, status", [
    ("500", Unavailable, 500), ("429:2.5", RateLimited, 429), ("garbage", Malformed, None),
    ("short", Malformed, None), ("drop", Unavailable, None), ("slow:10", TimedOut, None)])
async def test_each_fault_is_a_verdict_not_a_transport_exception(fault, verdict, status, stream):
    # FaultServer answers even a streamed call with one JSON body: no events, so "short" and "garbage" are
    # too few choices there; the status and connection faults are the same either way.
    with FaultServer([fault]) as srv:  # a tight read timeout for the slow fault only: this machine may be loaded
        c = client(srv.url, request_s=0.5 if fault.startswith("slow") else 30, stream=stream)
        try:
            with pytest.raises(CallError) as info:
                await c.generate([Request("r", "p", n=2)])
        finally:
            await c.aclose()
    assert type(info.value) is verdict and info.value.status == status
    if verdict is RateLimited:
        assert info.value.retry_after_s == 2.5
    if verdict is Unavailable and status is None:  # the transport's own error stays as the cause, for logs
        assert info.value.__cause__ is not None


async def test_a_refused_connection_is_unavailable_and_not_healthy(refused_url):
    c = client(refused_url)
    try:
        with pytest.raises(Unavailable) as info:
            await c.generate([Request("r", "p")])
        assert info.value.suspect and await c.healthy() is False and await c.metrics() is None
    finally:
        await c.aclose()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_4xx_is_rejected(stream):
    async with serve(ShapedServer()) as url:
        c = client(url + "/nowhere", stream=stream)
        try:
            with pytest.raises(Rejected) as info:
                await c.generate([Request("r", "p")])
            with pytest.raises(Rejected, match="dev_mode"):
                await c.admin("/collective_rpc", {"method": "x"})
        finally:
            await c.aclose()
    assert info.value.status == 404 and "HTTP 404" in str(info.value) and not info.value.retryable


async def test_health_metrics_and_a_closed_client():
    async with serve(ShapedServer()) as url:
        c = client(url)
        assert await c.healthy() is True
        await c.generate([Request("r", "p", sampling=SamplingParams(max_tokens=2))])
        assert "vllm:generation_tokens_total" in (await c.metrics() or "")
        await c.aclose()
        with pytest.raises(Unavailable, match="closed"):  # a closed client opens no new session
            await c.generate([Request("r", "p")])
        assert await c.healthy() is False
        with warnings.catch_warnings(record=True) as caught:  # a session left open warns when collected
            warnings.simplefilter("always")
            del c
            gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)]


async def test_max_connections_never_binds_so_no_call_waits_in_the_client():
    hold = Hold()
    async with serve(ShapedServer(hold=hold)) as url:
        c = client(url, max_connections=1, admission_s=0.01)
        try:
            calls = [asyncio.create_task(c.generate([Request(f"r{i}", "p")])) for i in range(8)]
            async with asyncio.timeout(10):  # all 8 reach the server at once: none queued behind a connection
                await hold.holding(8)
            hold.release()
            gens = await asyncio.gather(*calls)
        finally:
            await c.aclose()
    assert len(gens) == 8 and hold.peak == 8


async def test_calls_beyond_the_cap_wait_in_the_pool_not_in_the_client():
    """Per-engine cap C, 3C unpackable requests: the server holds exactly C calls, the pool queues the rest,
    and no call fails or times out waiting for a connection."""
    cap, hold = 4, Hold()
    server = ShapedServer(hold=hold)
    async with serve(server) as url:
        engine = EngineConfig(urls=[url], served_model_name="shaped")
        pool_cfg = PoolConfig(per_engine=cap, over_concurrency_ratio=1.0, pack_size=1, max_retries=0,
                              prewarm=PrewarmConfig(requests=0), timeouts=TimeoutConfig(admission_s=0.01))
        reqs = [Request(f"r{i}", "p", sampling=SamplingParams(max_tokens=2, seed=i)) for i in range(3 * cap)]
        async with RolloutPool(engine, pool_cfg, ControllerConfig(mode=ControllerMode.off)) as pool:
            run = asyncio.create_task(pool.generate(reqs))
            async with asyncio.timeout(10):
                await hold.holding(cap)
            probe = client(url)
            try:  # a round trip through the server: a call sent past the cap would have reached it by now
                assert await probe.healthy()
            finally:
                await probe.aclose()
            stats = pool.stats()
            held = hold.held
            hold.release()
            results = await run
    assert held == hold.peak == cap
    assert stats.engines[0].inflight == cap and stats.queued == 2 * cap
    assert all(r.ok and r.attempts == 1 for r in results) and server.calls == 3 * cap


async def test_control_calls_post_or_get_at_the_server_root():
    async with serve(ShapedServer()) as url:
        c = client(url + "/v1")
        try:
            assert await c.admin("/v1/models", method="GET") == {"object": "list", "data": [
                {"id": "shaped", "object": "model"}]}
            reply = await c.call_root("/health", method="GET")
            with pytest.raises(Rejected, match="GET /nowhere: 404"):
                await c.admin("/nowhere", method="GET")
        finally:
            await c.aclose()
    assert reply.status == 200 and reply.body == b""


async def test_a_connection_the_server_dropped_as_it_was_reused_is_tried_once_more():
    """The keep-alive race: the server closes an idle connection just as the client reuses it. The request
    never ran there, so it goes once more on a fresh connection; a second drop is the verdict."""
    seen = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.append(1)
        if len(seen) in drops:  # read the request, answer nothing, hang up
            writer.close()
            return
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    c = client(url)
    try:
        drops = {1}
        reply = await c.call_root("/pause", {"mode": "abort"})
        assert reply.status == 200 and len(seen) == 2
        drops, seen[:] = {1, 2}, []
        with pytest.raises(Unavailable):
            await c.call_root("/pause", {"mode": "abort"})
        assert len(seen) == 2  # once more, not for ever
    finally:
        await c.aclose()
        server.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_generate_call_dropped_on_a_reused_connection_before_any_answer_goes_once_more(stream):
    """The keep-alive race on a generate call: the server hangs up a kept-alive connection as the call reuses it.
    The call never ran there: it goes once more on a fresh connection instead of failing the engine (which sent
    both engines of a loaded CPU pair to ``suspect``: benchmarks/RESULTS.md, session 12). A drop on a fresh
    connection is the engine's verdict at once: that call may have run."""
    requests, hang_up = [], set()
    body = {"choices": [{"index": 0, "text": "x", "token_ids": [7], "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one connection, many requests
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
                await reader.readexactly(length)
                requests.append(writer.get_extra_info("peername"))
                if len(requests) in hang_up:
                    writer.close()
                    return
                payload = json.dumps(body).encode()
                if stream:
                    chunk = dict(body, choices=[dict(body["choices"][0])])
                    payload = (b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
                    ctype = b"text/event-stream"
                else:
                    ctype = b"application/json"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (ctype, len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    c = client(url, stream=stream)
    req = [Request("r", [1], sampling=SamplingParams(max_tokens=1))]
    try:
        hang_up = {2}  # the second call reuses the first's connection, and the server hangs up on it
        assert [g.samples[0].token_ids for g in await c.generate(req)] == [(7,)]
        assert [g.samples[0].token_ids for g in await c.generate(req)] == [(7,)]
        assert len(requests) == 3 and requests[1] == requests[0] != requests[2]  # reused, then a fresh one
        await c.aclose()
        c, requests[:], hang_up = client(url, stream=stream), [], {1}
        with pytest.raises(Unavailable):  # a fresh connection: nothing raced, the verdict stands
            await c.generate(req)
        assert len(requests) == 1
    finally:
        await c.aclose()
        server.close()


async def test_a_server_without_abort_requests_turns_the_clients_aborts_off():
    """A server not in vLLM's dev mode answers 404 to ``/abort_requests``: a move at a step's end cannot keep the
    tokens there, so the client stops offering its calls (pool/policy/spread.py) instead of failing each time."""
    async with serve(ShapedServer()) as url:
        c = client(url + "/v1")
        try:
            assert c.aborts_calls
            with pytest.raises(Rejected, match="/abort_requests: 404"):
                await c.abort_call("rpx-1", 2)
            assert not c.aborts_calls
        finally:
            await c.aclose()
