"""The engine client and the pool against the real vLLM CPU engine (one per session)."""

from __future__ import annotations


import pytest

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, EngineConfig, PoolConfig
from rollout_plugin.errors import EngineError, EngineStartError
from rollout_plugin.pool.transport.http import HttpEngineClient
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports
from rollout_plugin.pool import RolloutPool, SyncRolloutPool
from rollout_plugin.types import Request, SamplingParams

pytestmark = pytest.mark.engine

SHORT = SamplingParams(max_tokens=8, temperature=1.0, logprobs=True)


def client_for(engine, stream: bool = False) -> HttpEngineClient:
    return HttpEngineClient("live", engine.url, api_key=engine.api_key, model=engine.model_dir,
                            max_connections=8, connect_s=5, request_s=120, admission_s=30, health_s=5, stream=stream)


def attached(engine, **pool) -> tuple[EngineConfig, PoolConfig]:
    return (EngineConfig(urls=[engine.url], api_key=engine.api_key, max_model_len=engine.config.max_model_len),
            PoolConfig(**pool))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_packed_call_returns_each_group_in_order(live_engine, stream):
    client = client_for(live_engine, stream)
    try:
        reqs = [Request(f"r{i}", f"What is {i} + {i}?", n=2, sampling=SHORT) for i in range(3)]
        gens = await client.generate(reqs)
    finally:
        await client.aclose()
    assert len(gens) == 3 and all(len(g.samples) == 2 for g in gens)
    for g in gens:
        assert g.prompt_tokens > 0
        for s in g.samples:
            assert s.token_ids and len(s.token_ids) == len(s.logprobs) <= 8
            assert all(lp <= 0 for lp in s.logprobs) and s.finish_reason in ("length", "stop")


async def test_token_and_chat_prompts(live_engine):
    client = client_for(live_engine)
    try:
        (tok,) = await client.generate([Request("t", [1, 2, 3, 4], n=2, sampling=SHORT)])
        (chat,) = await client.generate([Request("c", [{"role": "user", "content": "hi"}], n=3, sampling=SHORT)])
    finally:
        await client.aclose()
    assert len(tok.samples) == 2 and tok.prompt_tokens == 4
    assert len(chat.samples) == 3 and all(s.token_ids for s in chat.samples)


async def test_pool_on_real_engine_keeps_caps_and_loses_nothing(live_engine):
    engine_cfg, pool_cfg = attached(live_engine, per_engine=32, k=4, pack_size=16)
    reqs = [Request(f"g{i}", f"Count to {i}:", n=4, sampling=SamplingParams(max_tokens=16)) for i in range(64)]
    async with RolloutPool(engine_cfg, pool_cfg, ControllerConfig(mode=ControllerMode.off)) as pool:
        results = await pool.generate(reqs)
        stats = pool.stats()
    assert [r.id for r in results] == [r.id for r in reqs]
    assert all(r.ok and len(r.samples) == 4 for r in results)
    (engine,) = stats.engines
    assert engine.samples == 256 and 0 < engine.peak_inflight <= pool.limits.engine_inflight == 39
    assert engine.calls < 64  # packed: never one HTTP call per group here


async def test_overlong_prompt_fails_alone_inside_a_pack(live_engine):
    engine_cfg, pool_cfg = attached(live_engine, per_engine=64, pack_size=64)
    long_prompt = "one two three four five six seven " * 400  # far above max_model_len=1024
    reqs = [Request(f"ok{i}", "Hello", sampling=SHORT) for i in range(6)]
    reqs.insert(3, Request("too-long", long_prompt, sampling=SHORT))
    async with RolloutPool(engine_cfg, pool_cfg) as pool:
        results = await pool.generate(reqs)
    by_id = {r.id: r for r in results}
    assert not by_id["too-long"].ok and "400" in by_id["too-long"].error
    assert all(by_id[f"ok{i}"].ok for i in range(6))


def test_sync_facade_generates_and_streams(live_engine):
    engine_cfg, pool_cfg = attached(live_engine, per_engine=16)
    reqs = [Request(f"s{i}", "Hi", sampling=SHORT) for i in range(10)]
    with SyncRolloutPool(engine_cfg, pool_cfg) as pool:
        assert [r.id for r in pool.generate(reqs)] == [r.id for r in reqs]
        streamed = list(pool.stream(reqs))
    assert sorted(r.id for r in streamed) == sorted(r.id for r in reqs) and all(r.ok for r in streamed)


async def test_engine_that_cannot_start_raises_with_its_log_tail(live_engine, tmp_path):
    cfg = EngineConfig(model=live_engine.model_dir, extra_args=["--no-such-flag"], log_dir=str(tmp_path))
    (port,) = reserve_ports(cfg.host, 0, 1)
    proc = EngineProcess(0, cfg, model=live_engine.model_dir, port=port, max_num_seqs=8, cpu_bind=None,
                         log_dir=tmp_path)
    proc.start()
    try:
        with pytest.raises(EngineStartError) as info:
            await proc.wait_ready(timeout_s=240)
    finally:
        proc.stop()
    assert "exited with code" in str(info.value) and "--no-such-flag" in info.value.log_tail


def test_port_in_use_is_refused_before_launch(live_engine):
    port = int(live_engine.url.rsplit(":", 1)[1])
    with pytest.raises(EngineError, match=f"engine.port={port}: port {port} on 127.0.0.1 is in use"):
        reserve_ports("127.0.0.1", port, 1)


async def test_unreachable_engine_is_marked_dead_and_its_work_moves(live_engine):
    (closed_port,) = reserve_ports("127.0.0.1", 0, 1)  # nothing listens there: connection refused
    engine_cfg = EngineConfig(urls=[f"http://127.0.0.1:{closed_port}", live_engine.url], api_key=live_engine.api_key,
                              served_model_name=live_engine.model_dir, max_model_len=1024)
    reqs = [Request(f"f{i}", "Hello", sampling=SHORT) for i in range(40)]
    async with RolloutPool(engine_cfg, PoolConfig(per_engine=8, pack_size=4)) as pool:
        results = await pool.generate(reqs)
        stats = pool.stats()
    assert all(r.ok for r in results) and {r.engine for r in results} == {"engine1"}
    assert [e.healthy for e in stats.engines] == [False, True] and stats.engines[0].failed_calls >= 1


async def test_an_engine_attached_at_runtime_joins_rotation(live_engine):
    from rollout_plugin.pool.engines.launcher import EngineEndpoint

    engine, pool_cfg = attached(live_engine, per_engine=8, pack_size=4)
    reqs = [Request(f"r{i}", f"Count to {i}:", sampling=SamplingParams(max_tokens=16, ignore_eos=True))
            for i in range(64)]
    async with RolloutPool(engine, pool_cfg) as pool:
        # a second client to the same server stands in for a new node's engine
        index = await pool.add_engine(EngineEndpoint("engine1", live_engine.url, live_engine.api_key))
        results = await pool.generate(reqs)
        stats = pool.stats()
    assert index == 1 and [e.name for e in stats.engines] == ["engine0", "engine1"]
    assert len({r.id for r in results}) == 64 and all(r.ok for r in results)
    assert {r.engine for r in results} == {"engine0", "engine1"}
