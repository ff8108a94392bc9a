"""Retry, backoff and rate-limit paths over real HTTP against a misbehaving server of our own."""

from __future__ import annotations

import pytest

from fault_server import FaultServer
from rollout_plugin.config.schema import (
    ControllerConfig,
    ControllerMode,
    EngineConfig,
    PoolConfig,
    RateLimitConfig,
    TimeoutConfig,
)
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request

OFF = ControllerConfig(mode=ControllerMode.off)


def engine_for(*servers: FaultServer, **kw) -> EngineConfig:
    return EngineConfig(urls=[s.url for s in servers], served_model_name="fault", **kw)


def pool_cfg(**kw) -> PoolConfig:
    kw.setdefault("backoff_base_s", 0.01)
    return PoolConfig(per_engine=4, pack_size=1, **kw)


@pytest.mark.parametrize("fault", ["500", "garbage", "429:0", "drop", "short"])
async def test_a_failed_call_is_retried_until_it_succeeds(fault):
    with FaultServer([fault, fault, "ok"]) as srv:
        async with RolloutPool(engine_for(srv), pool_cfg(), OFF) as pool:
            (result,) = await pool.generate([Request("r", "p", n=2)])
    assert result.ok and result.attempts == 3 and [s.text for s in result.samples] == ["answer 0.0", "answer 0.1"]
    assert [a for _, a in srv.calls] == [fault, fault, "ok"]


async def test_retries_run_out_into_an_error_record():
    with FaultServer(["500"] * 10) as srv:
        async with RolloutPool(engine_for(srv), pool_cfg(max_retries=2), OFF) as pool:
            (result,) = await pool.generate([Request("r", "p")])
    assert not result.ok and result.attempts == 3 and "HTTP 500" in result.error and len(srv.calls) == 3


async def test_retry_after_is_honoured():
    with FaultServer(["429:0.3", "ok"]) as srv:
        async with RolloutPool(engine_for(srv), pool_cfg(), OFF) as pool:
            (result,) = await pool.generate([Request("r", "p")])
    (t0, _), (t1, _) = srv.calls
    assert result.ok and t1 - t0 >= 0.3


async def test_a_call_slower_than_the_request_timeout_moves_to_another_engine():
    with FaultServer(["slow:2"]) as slow, FaultServer() as fast:
        cfg = pool_cfg(timeouts=TimeoutConfig(request_s=0.3, health_s=1))
        async with RolloutPool(engine_for(slow, fast), cfg, OFF) as pool:
            results = await pool.generate([Request(f"r{i}", "p") for i in range(4)])
    assert all(r.ok for r in results) and len({r.id for r in results}) == 4
    assert any(r.engine == "engine1" and r.attempts == 2 for r in results)


async def test_hosted_rate_limit_spaces_calls():
    # 600 requests/minute with 0.1 s of burst: one call may go at once, then one every 0.1 s.
    with FaultServer() as srv:
        engine = engine_for(srv, rate_limit=RateLimitConfig(rpm=600, burst_s=0.1), extra_body={"service_tier": "flex"})
        async with RolloutPool(engine, pool_cfg(), OFF) as pool:
            results = await pool.generate([Request(f"r{i}", "p") for i in range(6)])
    times = sorted(t for t, _ in srv.calls)
    assert all(r.ok for r in results) and times[-1] - times[0] >= 0.45
