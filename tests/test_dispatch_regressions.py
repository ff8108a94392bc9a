"""One test per behaviour the dispatcher-core issue reproduced on the old dispatcher (each failed there)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import pytest

from fakes import FakeEngine
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, GroupConfig, PoolConfig
from rollout_plugin.errors import EngineError, PoolError, TrainerAdapterError
from rollout_plugin.pool.core.engine_client import RateLimited
from rollout_plugin.pool import RolloutPool, RpcAnswer, SyncRolloutPool, require_ok
from rollout_plugin.types import Request, SamplingParams

PACKAGE = Path(__file__).parents[1] / "rollout_plugin"


def pool_of(engines, *, controller: str = "off", **cfg) -> RolloutPool:
    return RolloutPool(pool=PoolConfig(**cfg), controller=ControllerConfig(mode=ControllerMode(controller)),
                       clients=engines)


async def until(predicate, what: str, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)  # yielding to the pool's tasks while polling its state


# 1 ------------------------------------------------------------------------------------------------
async def test_a_request_above_every_current_cap_does_not_block_smaller_ones_behind_it():
    engines = [FakeEngine("a"), FakeEngine("b")]
    async with pool_of(engines, per_engine=16, over_concurrency_ratio=1.0, k=8,
                       groups=GroupConfig(mode="together")) as pool:
        for i in range(2):
            pool._dispatcher.set_cap(i, 4, "test: KV pressure")
        big = pool.submit(Request("big", "p", n=8))
        small = pool.submit(Request("small", "q", n=1))
        result = await asyncio.wait_for(small, 5)  # old dispatcher: both still pending after 30 s
        assert result.ok and not big.done()
        for i in range(2):
            pool._dispatcher.set_cap(i, 16, "test: pressure gone")
        assert (await asyncio.wait_for(big, 5)).ok


async def test_the_controller_raises_a_cut_cap_to_the_largest_pending_n_with_nothing_in_flight():
    engines = [FakeEngine("a")]
    async with pool_of(engines, controller="adaptive", per_engine=16, over_concurrency_ratio=1.0, k=1) as pool:
        await until(lambda: pool.monitor.states is not None, "the monitor's first look")
        pool._dispatcher.set_cap(0, 4, "test: KV pressure")
        pool.monitor.states[0] = pool.monitor.states[0].__class__(**{**pool.monitor.states[0].__dict__, "cap": 4})
        result = await asyncio.wait_for(pool.submit(Request("big", "p", n=8)), 10)
    assert result.ok and len(result.samples) == 8


async def test_an_n_no_engine_could_ever_hold_is_refused_in_one_line():
    async with pool_of([FakeEngine("a")], per_engine=4, over_concurrency_ratio=1.0) as pool:
        with pytest.raises(ValueError, match=r"n=9 samples; one request may ask 1 to 4 .*pool.per_engine"):
            pool.submit(Request("r", "p", n=9))


# 2 ------------------------------------------------------------------------------------------------
async def test_split_mode_fills_the_global_cap_counted_in_samples():
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()
    async with pool_of([engine], per_engine=64, over_concurrency_ratio=1.0, k=8, pack_size=1,
                       groups=GroupConfig(mode="split")) as pool:
        task = asyncio.ensure_future(pool.generate([Request(f"g{i}", f"p{i}", n=8) for i in range(16)]))
        await until(lambda: engine.inflight >= 64, "64 samples in flight")  # old: stuck at 8 (groups)
        assert pool.stats().samples_inflight == 64
        engine.gate.set()
        results = await task
    assert all(r.ok and len(r.samples) == 8 for r in results) and engine.peak == 64


# 3 ------------------------------------------------------------------------------------------------
class ShortOnce(FakeEngine):
    """Returns one generation too few on its first call, as a buggy or injected client might."""

    async def generate(self, requests):
        gens = await super().generate(requests)
        if len(self.calls) == 1:
            return gens[:-1]
        return gens


async def test_a_short_reply_is_retried_and_every_id_resolves():
    engine = ShortOnce("a")
    async with pool_of([engine], per_engine=8, pack_size=4) as pool:
        results = await pool.generate([Request(f"r{i}", "p") for i in range(4)])
        stats = pool.stats()
    assert [r.id for r in results] == ["r0", "r1", "r2", "r3"] and all(r.ok for r in results)
    assert stats.samples_inflight == 0 and stats.requests_done == 4


# 4 ------------------------------------------------------------------------------------------------
async def test_every_engine_dying_raises_pool_error_not_cancelled_error():
    engines = [FakeEngine("a"), FakeEngine("b")]
    for e in engines:
        e.gate = asyncio.Event()
    with pytest.raises(PoolError, match="every engine is dead"):
        async with pool_of(engines, per_engine=4) as pool:
            task = asyncio.ensure_future(pool.generate([Request(f"r{i}", "p") for i in range(6)]))
            await until(lambda: sum(e.inflight for e in engines) >= 6, "work in flight")
            for i in range(2):
                pool._dispatcher.mark_dead(i, "test: killed")
            await task  # the old dispatcher cancelled these futures: CancelledError


class ProbeRaises(FakeEngine):
    async def healthy(self) -> bool:
        raise OSError("probe: connection reset")


class FailingProvider:
    """A backend whose node watch raises, and whose growth fails, while the pool works."""

    startup_s: list[float] = []

    def __init__(self):
        self.closed = False

    async def watch(self, on_dead, on_capacity):
        on_capacity("test: a node joined")  # -> growth, whose add() raises below
        raise RuntimeError("ray.nodes() failed")

    def can_grow(self, engines: int) -> bool:
        return True

    async def add(self):
        raise RuntimeError("add_engine failed inside growth")

    async def replace(self, index: int):
        raise EngineError("no replacement")

    def close(self) -> None:
        self.closed = True


async def test_failing_helpers_never_cancel_the_callers_generate():
    flaky = ProbeRaises("flaky", fail_with=None)
    flaky.dead = True  # its calls fail as if down; the probe that follows raises OSError
    good = FakeEngine("good")
    pool = pool_of([flaky, good], per_engine=4, pack_size=1)
    pool.provider = FailingProvider()
    async with pool:
        results = await pool.generate([Request(f"r{i}", "p") for i in range(12)])
        failures = [name for name, _ in pool._supervisor.failures]
    assert all(r.ok and r.engine == "good" for r in results)
    assert "engine-watch" in failures and "growth" in failures and "flaky-probe" in failures
    assert pool.provider.closed


# 5 ------------------------------------------------------------------------------------------------
class AlwaysLimited(FakeEngine):
    async def generate(self, requests):
        self.calls.append([r.id for r in requests])
        raise RateLimited(f"{self.name}: rate limited (429)", status=429, retry_after_s=3600.0)


async def test_close_cancels_backoffs_even_with_an_hour_of_retry_after():
    pool = pool_of([AlwaysLimited("a")], per_engine=4, max_retries=5)
    t0 = time.monotonic()
    async with pool:
        future = pool.submit(Request("r", "p"))
        await until(lambda: pool.stats().backing_off == 1, "the backoff")
    result = future.result()
    assert time.monotonic() - t0 < 5  # the old pool waited out the Retry-After
    assert not result.ok and "closed before this request finished" in result.error


async def test_retry_after_is_capped_by_the_backoff_cap():
    engine = AlwaysLimited("a")
    async with pool_of([engine], per_engine=4, max_retries=2, backoff_cap_s=0.01) as pool:
        result = await asyncio.wait_for(pool.submit(Request("r", "p")), 5)
    assert not result.ok and "429" in result.error and len(engine.calls) == 3


def test_launched_engines_are_stopped_all_at_once():
    from rollout_plugin.pool.engines.launcher import stop_all

    barrier = threading.Barrier(3, timeout=10)  # passes only if all three stops run at the same time
    stopped = []

    class Stopping:
        def __init__(self, name):
            self.name, self.proc = name, object()

        def stop(self):
            barrier.wait()  # a sequential stop_all would break the barrier (BrokenBarrierError, logged)
            stopped.append(self.name)

    stop_all([Stopping(f"engine{i}") for i in range(3)])
    assert sorted(stopped) == ["engine0", "engine1", "engine2"]


# 6 ------------------------------------------------------------------------------------------------
class FirstCallOnly(FakeEngine):
    """Answers its first call; every later call waits until cancelled (a slow engine)."""

    async def generate(self, requests):
        if self.calls:
            self.calls.append([r.id for r in requests])
            await asyncio.Event().wait()
        return await super().generate(requests)


def test_sync_stream_abandoned_after_the_first_result_stops_generating():
    engine = FirstCallOnly("a")
    with SyncRolloutPool(pool=PoolConfig(per_engine=2, over_concurrency_ratio=1.0, pack_size=1),
                         clients=[engine]) as pool:
        for _ in pool.stream([Request(f"r{i}", "p") for i in range(200)]):
            break
        deadline = time.monotonic() + 5
        while (pool.stats().queued or pool.stats().samples_inflight) and time.monotonic() < deadline:
            time.sleep(0.01)  # the pool's own thread drops the rest; nothing to await from this one
        stats = pool.stats()  # taken on the pool's loop, from this thread
        sent = sum(len(c) for c in engine.calls)
    # The old facade kept the other 199 queued (and generating) until the pool closed.
    assert stats.queued == 0 and stats.samples_inflight == 0 and stats.requests_done == 1
    assert sent <= 3  # the first call and what was already in flight


def test_sync_stats_run_on_the_pools_loop():
    seen = []

    class Probe(FakeEngine):
        pass

    with SyncRolloutPool(pool=PoolConfig(per_engine=2), clients=[Probe("a")]) as pool:
        original = pool._pool.stats

        def spy():
            seen.append(threading.current_thread().name)
            return original()

        pool._pool.stats = spy
        pool.stats()
    assert seen == ["rollout-pool"]


# 7 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
async def test_admission_work_per_request_is_flat_in_queued_distinct_params(shared):
    from rollout_plugin.pool.core import queue as queue_module

    counts = {}
    for size in (1000, 8000):
        touched = 0
        original = queue_module.UnitQueue._top

        def counting(self, n, _orig=original):
            nonlocal touched
            touched += 1
            return _orig(self, n)

        queue_module.UnitQueue._top = counting
        try:
            engine = FakeEngine("a", tokens=1)
            async with pool_of([engine], per_engine=64, pack_size=1) as pool:
                reqs = [Request(f"r{i}", "p", sampling=SamplingParams(seed=None if shared else i)) for i in range(size)]
                await pool.generate(reqs)
        finally:
            queue_module.UnitQueue._top = original
        counts[size] = touched / size
    # Heap heads examined per admission: flat in the queue's depth (the old scan was O(keys) per admission).
    assert counts[8000] <= 1.5 * counts[1000], counts


# 9 ------------------------------------------------------------------------------------------------
def test_policy_never_sees_http_and_front_ends_never_reach_inside_the_pool():
    pool = PACKAGE / "pool"
    for path in [*(pool / "dispatch").glob("*.py"), pool / "core" / "ledger.py", pool / "policy" / "routing.py"]:
        policy = path.read_text()
        for word in ("httpx", "aiohttp", "status", "429", "500"):
            assert word not in policy, f"{path.name} mentions {word!r}: policy must see verdicts only"
    for path in [PACKAGE / "gateway" / "app.py", *(PACKAGE / "adapters").rglob("*.py")]:
        text = path.read_text()
        assert "_dispatcher" not in text and ".dispatcher" not in text, f"{path.name} reaches inside the pool"


def test_engine_calls_have_one_error_behaviour():
    """One helper turns failed engine answers into an error (issue 20: there were three): it names every failed
    engine, the call and why, adds the dev-mode fix on a 404, and no module keeps a copy of the check."""
    call = "POST /collective_rpc"
    answers = [RpcAnswer("e0", 200, {"ok": True}, call=call),
               RpcAnswer("e1", 500, error="e1: POST /collective_rpc: HTTP 500: boom", call=call),
               RpcAnswer("e2", 404, call=call)]
    assert require_ok(answers[:1]) == answers[:1]
    with pytest.raises(EngineError) as failed:
        require_ok(answers)
    assert str(failed.value) == ("POST /collective_rpc failed on 2 of 3 engines: e1: HTTP 500: boom; e2: HTTP 404 "
                                 "(the engine needs vLLM's dev endpoints (engine.dev_mode=true, "
                                 "i.e. VLLM_SERVER_DEV_MODE=1))")
    with pytest.raises(TrainerAdapterError, match="^POST /collective_rpc failed on 2 of 3 engines: e1"):
        require_ok(answers, error=TrainerAdapterError)
    # A failed engine answer checked and raised on the spot (the three old copies' shape): only in the one helper.
    copy = re.compile(r"not \w+\.ok\b.*\n(?:.*\n){0,3}?\s*raise .*\.(engine|status)\b")
    home = PACKAGE / "pool" / "transport" / "rpc.py"
    copies = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p != home and copy.search(p.read_text())]
    assert copies == [], copies

