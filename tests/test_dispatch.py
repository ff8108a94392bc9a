"""Policy of the pool against in-memory engines: caps, packing, exactly-once, failover."""

from __future__ import annotations

import asyncio

import pytest

from fakes import FakeEngine
from rollout_plugin.config.schema import PoolConfig
from rollout_plugin.errors import PoolError
from rollout_plugin.pool.core.engine_client import Unavailable
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams


def requests(count: int, n: int = 1, prefix: str = "r") -> list[Request]:
    return [Request(f"{prefix}{i}", f"prompt {i}", n=n) for i in range(count)]


def pool_of(engines, **cfg) -> RolloutPool:
    return RolloutPool(pool=PoolConfig(**cfg), clients=engines)


async def test_results_in_input_order_exactly_once():
    engines = [FakeEngine("a"), FakeEngine("b")]
    async with pool_of(engines, per_engine=8, k=2, pack_size=4) as pool:
        results = await pool.generate(requests(50, n=2))
    assert [r.id for r in results] == [f"r{i}" for i in range(50)]
    assert all(r.ok and len(r.samples) == 2 for r in results)
    sent = [rid for e in engines for call in e.calls for rid in call]
    assert sorted(sent) == sorted(f"r{i}" for i in range(50))  # each sent once: no failures here


async def test_per_engine_and_global_caps_hold_while_saturated():
    engines = [FakeEngine("a"), FakeEngine("b")]
    for e in engines:
        e.gate = asyncio.Event()
    async with pool_of(engines, per_engine=10, over_concurrency_ratio=1.2, k=1, pack_size=4,
                       max_concurrent=20) as pool:
        task = asyncio.ensure_future(pool.generate(requests(100)))
        async with asyncio.timeout(5):
            while pool.stats().groups_inflight < 20:
                await asyncio.sleep(0)
        stats = pool.stats()
        assert stats.groups_inflight == 20 and stats.queued == 80
        assert all(e.inflight <= 12 for e in engines)  # ceil(10 × 1.2)
        for e in engines:
            e.gate.set()
        results = await task
    assert len(results) == 100 and all(r.ok for r in results)
    assert max(e.peak for e in engines) <= 12


async def test_packs_compatible_requests_into_one_call():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    async with pool_of([engine], per_engine=100, pack_size=16) as pool:
        task = asyncio.ensure_future(pool.generate(requests(32)))
        async with asyncio.timeout(5):
            while pool.stats().queued:
                await asyncio.sleep(0)
        engine.gate.set()
        await task
    assert [len(c) for c in engine.calls] == [16, 16]


async def test_different_sampling_params_never_share_a_call():
    engine = FakeEngine("a")
    reqs = [Request(f"r{i}", "p", sampling=SamplingParams(temperature=0.5 + (i % 2))) for i in range(8)]
    async with pool_of([engine], per_engine=100, pack_size=16) as pool:
        await pool.generate(reqs)
    for call in engine.calls:
        assert len({int(rid[1:]) % 2 for rid in call}) == 1


async def test_groups_go_whole_with_n():
    engine = FakeEngine("a")
    async with pool_of([engine], per_engine=64, k=8, pack_size=16) as pool:
        results = await pool.generate(requests(6, n=8))
    assert all(len(r.samples) == 8 for r in results)
    assert all(len(c) <= 2 for c in engine.calls)  # 16 samples per call = 2 groups of 8


async def test_dead_engine_loses_nothing():
    alive, dead = FakeEngine("alive"), FakeEngine("dead", dead=True)
    async with pool_of([dead, alive], per_engine=4, pack_size=2, max_retries=2) as pool:
        results = await pool.generate(requests(40))
        stats = pool.stats()
    assert len(results) == 40 and all(r.ok for r in results)
    assert {r.engine for r in results} == {"alive"}
    assert [e.healthy for e in stats.engines] == [False, True]


async def test_every_engine_dead_fails_the_pool():
    engines = [FakeEngine("a", dead=True), FakeEngine("b", dead=True)]
    with pytest.raises(PoolError, match="every engine is dead"):
        async with pool_of(engines, per_engine=4) as pool:
            await pool.generate(requests(10))


async def test_bad_member_of_a_pack_fails_alone():
    engine = FakeEngine("a")
    engine.bad_ids = {"r3"}
    async with pool_of([engine], per_engine=64, pack_size=8) as pool:
        results = await pool.generate(requests(8))
    assert [r.ok for r in results] == [i != 3 for i in range(8)]
    assert "400" in results[3].error


async def test_retryable_errors_become_error_records_after_max_retries():
    engine = FakeEngine("a", fail_with=Unavailable("HTTP 503", status=503))
    async with pool_of([engine], per_engine=4, max_retries=2, backoff_base_s=0.001) as pool:
        (result,) = await pool.generate(requests(1))
    assert not result.ok and result.attempts == 3 and "503" in result.error


async def test_duplicate_ids_in_flight_are_refused():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    async with pool_of([engine], per_engine=4) as pool:
        pool.submit(Request("same", "p"))
        with pytest.raises(ValueError, match="already in flight"):
            pool.submit(Request("same", "p"))
        engine.gate.set()


async def test_stream_yields_as_finished():
    slow, fast = FakeEngine("slow"), FakeEngine("fast")
    slow.gate = asyncio.Event()
    async with pool_of([slow, fast], per_engine=1, over_concurrency_ratio=1.0, pack_size=1) as pool:
        seen = []
        async for result in pool.stream(requests(5)):
            seen.append(result.engine)
            if len(seen) == 4:
                slow.gate.set()
    assert seen[:4] == ["fast"] * 4 and seen[4] == "slow"


async def test_closing_fails_waiting_requests_instead_of_hanging():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    pool = pool_of([engine], per_engine=1, over_concurrency_ratio=1.0)
    async with pool:
        futures = [pool.submit(r) for r in requests(3)]
        async with asyncio.timeout(5):
            while pool.stats().groups_inflight < 1:
                await asyncio.sleep(0)
    # Queued and in flight alike: an error record each, never a cancelled future.
    assert all(f.done() and not f.cancelled() for f in futures)
    results = [f.result() for f in futures]
    assert all(not r.ok and "closed before this request finished" in r.error for r in results)


async def test_chat_requests_go_one_per_call():
    engine = FakeEngine("a")
    reqs = [Request(f"c{i}", [{"role": "user", "content": f"hi {i}"}], n=2) for i in range(5)]
    async with pool_of([engine], per_engine=64, pack_size=64) as pool:
        results = await pool.generate(reqs)
    assert all(r.ok for r in results)
    assert sorted(c[0] for c in engine.calls) == [f"c{i}" for i in range(5)] and len(engine.calls) == 5


async def test_abandoned_stream_stops_generating_its_requests():
    engine = FakeEngine("a")
    async with pool_of([engine], per_engine=2, over_concurrency_ratio=1.0, pack_size=1) as pool:
        async for _ in pool.stream(requests(50)):
            break  # the consumer walks away after the first result
        queued_after_break = pool.stats().queued
        later = await pool.generate(requests(3, prefix="next"))
    sent = sum(len(c) for c in engine.calls)
    assert all(r.ok for r in later)
    assert sent <= 2 + 2 + 3 and queued_after_break <= 48  # at most what was already in flight


async def test_weight_update_drains_then_tags_results_with_the_new_version():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    async with pool_of([engine], per_engine=4, over_concurrency_ratio=1.0, pack_size=1) as pool:
        first = [pool.submit(r) for r in requests(4, prefix="old")]
        async with asyncio.timeout(5):
            while pool.stats().groups_inflight < 4:
                await asyncio.sleep(0)
        engine.gate.set()
        async with pool.weight_update(version=7):
            assert all(f.done() for f in first)  # drained before the weights change
            later = [pool.submit(r) for r in requests(4, prefix="new")]
            await asyncio.sleep(0)
            assert pool.stats().groups_inflight == 0  # paused: nothing admitted during the update
        results = [await f for f in first] + [await f for f in later]
    assert [r.weight_version for r in results] == [0] * 4 + [7] * 4


async def test_cancel_before_a_call_starts_keeps_the_books():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    async with pool_of([engine], per_engine=4, over_concurrency_ratio=1.0, pack_size=1) as pool:
        futures = [pool.submit(r) for r in requests(4)]
        async with asyncio.timeout(5):
            while pool.stats().groups_inflight < 4:  # dispatched; the call tasks have not run yet
                await asyncio.sleep(0)
        async with pool.weight_update(abort=True):
            assert pool.stats().groups_inflight == 0 and pool.stats().engines[0].inflight == 0
        engine.gate.set()
        results = [await f for f in futures]
    assert all(r.ok and r.weight_version == 1 for r in results)


async def test_weight_update_with_abort_requeues_under_the_same_ids():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    async with pool_of([engine], per_engine=4, over_concurrency_ratio=1.0, pack_size=1) as pool:
        futures = [pool.submit(r) for r in requests(4)]
        async with asyncio.timeout(5):
            while engine.inflight < 4:  # the calls have reached the engine
                await asyncio.sleep(0)
        async with pool.weight_update(abort=True):
            assert not any(f.done() for f in futures)
        engine.gate.set()
        results = [await f for f in futures]
    assert [r.id for r in results] == [f"r{i}" for i in range(4)]
    assert all(r.ok and r.weight_version == 1 and r.attempts == 1 for r in results)
    assert sum(len(c) for c in engine.calls) == 8  # each sent twice, resolved once


async def test_hung_engine_is_marked_dead_and_its_inflight_work_moves():
    hung, good = FakeEngine("hung"), FakeEngine("good")
    hung.gate = asyncio.Event()  # never opens: calls hang like a SIGSTOPped server
    async with pool_of([hung, good], per_engine=2, over_concurrency_ratio=1.0, pack_size=1) as pool:
        task = asyncio.ensure_future(pool.generate(requests(10)))
        async with asyncio.timeout(5):
            while hung.inflight < 2:
                await asyncio.sleep(0)
        pool._dispatcher.mark_dead(0, "test: hung")
        results = await task
    assert all(r.ok and r.engine == "good" for r in results)
    assert len({r.id for r in results}) == 10


def split_pool(engines, mode="auto", **cfg) -> RolloutPool:
    from rollout_plugin.config.schema import ControllerConfig, GroupConfig

    return RolloutPool(pool=PoolConfig(groups=GroupConfig(mode=mode), **cfg),
                       controller=ControllerConfig(mode="off"), clients=engines)


async def starve(pool: RolloutPool, index: int, cap: int) -> None:
    """Give one engine a cap below the group size, after the monitor's first look (which would
    otherwise lift it back to one group)."""
    async with asyncio.timeout(5):
        while pool.monitor.states is None:
            await asyncio.sleep(0.01)
    pool._dispatcher.set_cap(index, cap, "test: a KV-starved engine that can't hold a group")


async def test_a_group_splits_only_when_its_engine_is_far_fuller_and_joins_into_one_result():
    a, b = FakeEngine("a"), FakeEngine("b")
    a.gate = asyncio.Event()  # a keeps what it gets until released
    async with split_pool([a, b], per_engine=16, over_concurrency_ratio=1.0, k=8, pack_size=8) as pool:
        await starve(pool, 1, 6)
        task = asyncio.ensure_future(pool.generate(requests(4, n=8)))
        async with asyncio.timeout(5):
            while b.peak < 6:
                await asyncio.sleep(0)
        assert pool._dispatcher.groups_split == 1  # the first went whole to a; the second split 6 + 2
        a.gate.set()
        results = await task
    assert [r.id for r in results] == [f"r{i}" for i in range(4)]
    assert all(r.ok and len(r.samples) == 8 for r in results)
    assert sorted(r.engine for r in results).count("b+a") >= 1
    assert b.peak <= 6 and a.peak <= 16


async def test_groups_never_split_in_together_mode():
    a, b = FakeEngine("a"), FakeEngine("b")
    a.gate = asyncio.Event()
    async with split_pool([a, b], "together", per_engine=16, over_concurrency_ratio=1.0, k=8, pack_size=8) as pool:
        await starve(pool, 1, 6)
        task = asyncio.ensure_future(pool.generate(requests(4, n=8)))
        async with asyncio.timeout(5):
            while a.peak < 16:
                await asyncio.sleep(0)
        a.gate.set()
        results = await task
    assert all(r.ok and len(r.samples) == 8 and r.engine == "a" for r in results)
    assert not b.calls and pool._dispatcher.groups_split == 0


async def test_split_mode_sends_each_sample_alone_and_still_answers_once_per_group():
    engines = [FakeEngine("a"), FakeEngine("b")]
    async with split_pool(engines, "split", per_engine=16, k=4, pack_size=1) as pool:
        results = await pool.generate(requests(6, n=4))
    assert all(r.ok and len(r.samples) == 4 for r in results)
    assert len({r.id for r in results}) == 6
    assert sum(len(c) for e in engines for c in e.calls) == 24 and all(len(c) == 1 for e in engines for c in e.calls)


async def test_a_failed_piece_fails_its_group_once():
    bad = FakeEngine("bad")
    bad.bad_ids = {"r0"}  # rejects every piece of r0 with HTTP 400 (not retryable)
    async with split_pool([bad], "split", per_engine=8, k=4, pack_size=1) as pool:
        results = await pool.generate(requests(2, n=4))
        stats = pool.stats()
    assert [r.id for r in results] == ["r0", "r1"]
    assert not results[0].ok and "400" in results[0].error and results[1].ok and len(results[1].samples) == 4
    assert (stats.requests_done, stats.requests_failed) == (1, 1)  # the group counts once, not per piece


@pytest.mark.parametrize("timeout_s, calls", [(0.0, [["r0"], ["r1", "r2", "r3"]]), (30.0, [["r0", "r1", "r2", "r3"]])])
async def test_pack_timeout_holds_a_small_pack_until_it_fills(timeout_s, calls):
    engine = FakeEngine("a")
    async with pool_of([engine], per_engine=16, pack_size=4, pack_timeout_s=timeout_s) as pool:
        first = pool.submit(Request("r0", "p"))
        for _ in range(3):  # let the dispatcher look at the lone request
            await asyncio.sleep(0)
        rest = [pool.submit(Request(f"r{i}", "p")) for i in range(1, 4)]
        results = [await f for f in [first, *rest]]
    assert all(r.ok for r in results)
    assert engine.calls == calls  # with a timeout, the full pack went at once, long before 30 s


async def test_pack_timeout_sends_a_partial_pack_when_it_expires():
    engine = FakeEngine("a")
    async with pool_of([engine], per_engine=16, pack_size=4, pack_timeout_s=0.05) as pool:
        results = await pool.generate(requests(2))
    assert all(r.ok for r in results) and engine.calls == [["r0", "r1"]]


async def test_an_engine_added_at_runtime_takes_work_and_grows_the_global_cap():
    from rollout_plugin.pool.observe.telemetry import EngineMetrics

    a, b = FakeEngine("a"), FakeEngine("b")
    a.gate = asyncio.Event()
    async with pool_of([a], per_engine=4, over_concurrency_ratio=1.0, pack_size=1) as pool:
        before = pool.limits.max_concurrent
        task = asyncio.ensure_future(pool.generate(requests(20)))
        async with asyncio.timeout(5):
            while a.inflight < 4:
                await asyncio.sleep(0)
        dispatcher = pool._dispatcher
        index = dispatcher.add_client(b, pool_limits_for(pool, 2))  # what RolloutPool.add_engine does
        assert index == 1 and dispatcher.limits.max_concurrent > before
        async with asyncio.timeout(5):
            while len(b.calls) < 10:  # a is stuck: the newcomer takes the queue
                await asyncio.sleep(0)
        a.gate.set()
        results = await task
        pool.monitor.observe([EngineMetrics(), EngineMetrics()])  # the newcomer gets a controller too
    assert len({r.id for r in results}) == 20 and all(r.ok for r in results)
    assert {r.engine for r in results} == {"a", "b"} and len(pool.monitor.states) == 2


def pool_limits_for(pool: RolloutPool, engines: int):
    from rollout_plugin.pool.api.pool import pool_limits

    return pool_limits(pool.engine_cfg, pool.pool_cfg, engines)


class SlowToAnswerHealth(FakeEngine):
    """A live engine whose first call is dropped and whose first health check times out (a busy API process)."""

    def __init__(self, name: str):
        super().__init__(name, dead=True)  # the first call fails as a refused one would
        self.looks = 0

    async def healthy(self) -> bool:
        self.looks += 1
        if self.looks == 1:
            await asyncio.sleep(0.6)  # as long as a health timeout: the probe takes it for one, not for an answer
            self.dead = False
            return False
        return True


async def test_a_health_check_that_times_out_once_does_not_take_a_live_engine_out():
    engine = SlowToAnswerHealth("busy")
    async with pool_of([engine], per_engine=4, pack_size=1, max_retries=3, backoff_base_s=0.01) as pool:
        results = await pool.generate(requests(8))
        healthy = pool.stats().engines[0].healthy
    assert all(r.ok for r in results) and healthy and engine.looks == 2


async def test_a_health_check_that_fails_at_once_is_the_verdict():
    alive, dead = FakeEngine("alive"), FakeEngine("dead", dead=True)
    looks = []
    dead.healthy = lambda: looks.append(1) or asyncio.sleep(0, result=False)
    async with pool_of([dead, alive], per_engine=4, pack_size=1) as pool:
        results = await pool.generate(requests(8))
        while pool.stats().engines[0].healthy:  # the probe runs beside the calls
            await asyncio.sleep(0.01)  # polling the pool with pytest's timeout
    assert all(r.ok for r in results) and looks == [1]
