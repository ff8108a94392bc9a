"""How often the monitor looks at the engines (pool/policy/cadence.py): every interval_s while something needs
deciding, thinning out to quiet_interval_s while nothing does, back at once when work queues. Why: each look is a
/metrics call on the engine's API server, and on the CPU pair a 1 Hz look cost ~10 % of a busy step
(benchmarks/RESULTS.md, session 8)."""

from __future__ import annotations

import asyncio

import pytest

from fakes import FakeEngine
from test_control import METRICS  # a vLLM-shaped /metrics text: no KV pressure, no new preemptions
from rollout_plugin.config.schema import CollectConfig, ControllerConfig, PoolConfig
from rollout_plugin.config.validate import validate_collect
from rollout_plugin.errors import ConfigError
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.policy.cadence import Needs, next_wait, tail_opened
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request


def test_the_wait_doubles_while_nothing_needs_deciding_up_to_the_quiet_interval():
    waits, w = [], 1.0
    for _ in range(6):
        w = next_wait(w, Needs(), 1.0, 8.0)
        waits.append(w)
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize("need", [Needs(backlog=1), Needs(at_cap=True), Needs(pressure=True), Needs(deciding=True),
                                  Needs(slow=True), Needs(unseen=True)])
def test_anything_to_decide_brings_the_wait_back_to_the_interval(need):
    assert next_wait(8.0, need, 1.0, 8.0) == 1.0


def test_a_quiet_interval_at_or_below_the_interval_keeps_the_old_fixed_period():
    assert next_wait(1.0, Needs(), 1.0, 1.0) == 1.0 and next_wait(2.0, Needs(), 2.0, 1.0) == 2.0


def test_a_quiet_interval_below_the_interval_is_a_config_error_naming_the_key():
    cfg = CollectConfig()
    cfg.controller.interval_s, cfg.controller.quiet_interval_s = 2.0, 1.0
    with pytest.raises(ConfigError, match=r"controller\.quiet_interval_s=1\.0: must be >= 2\.0"):
        validate_collect(cfg)


class Counting(FakeEngine):
    """Counts /metrics calls: each is a call on the real engine's API server."""

    def __init__(self, name: str):
        super().__init__(name)
        self.metrics_text = METRICS
        self.looks = 0
        self.at: list[float] = []

    async def metrics(self):
        self.looks += 1
        self.at.append(asyncio.get_running_loop().time())
        return self.metrics_text


def _looks_over(seconds: float, ctl: ControllerConfig) -> int:
    async def main():
        engine = Counting("a")
        loop = asyncio.get_running_loop()
        async with RolloutPool(pool=PoolConfig(per_engine=64), controller=ctl, clients=[engine], clock=loop.time):
            await asyncio.sleep(seconds)
        return engine.looks

    return run_virtual(main())


def test_an_idle_pool_looks_at_its_engines_far_less_than_once_a_second():
    quiet = _looks_over(120.0, ControllerConfig(expected_tokens=64))
    fixed = _looks_over(120.0, ControllerConfig(expected_tokens=64, quiet_interval_s=1.0))
    assert fixed >= 100, fixed  # the old period, kept by quiet_interval_s = interval_s
    assert quiet <= 20, quiet  # 1, 2, 4, then every 8 s


def test_work_that_queues_while_the_monitor_waits_brings_the_looks_back_at_once():
    async def main():
        engine = Counting("a")
        loop = asyncio.get_running_loop()
        ctl = ControllerConfig(expected_tokens=64)
        async with RolloutPool(pool=PoolConfig(per_engine=8, over_concurrency_ratio=1.0), controller=ctl,
                               clients=[engine], clock=loop.time) as pool:
            await asyncio.sleep(60.0)
            assert pool.monitor.wait_s == ctl.quiet_interval_s  # backed off: nothing to decide
            looks = engine.looks
            while engine.looks == looks:  # virtual time: until the next look, then half a second on
                await asyncio.sleep(0.25)
            await asyncio.sleep(0.5)  # the next look is ~7.5 s away unless the queue calls it
            engine.gate = asyncio.Event()  # calls hang: 100 requests over a cap of 8 queue in the pool
            submitted = loop.time()
            task = asyncio.ensure_future(pool.generate([Request(f"r{i}", "p") for i in range(100)]))
            await asyncio.sleep(6.0)
            assert pool.stats().queued > 0 and pool.monitor.wait_s == ctl.interval_s
            engine.gate.set()
            assert all(r.ok for r in await task)
        return [t - submitted for t in engine.at if t > submitted]

    after = run_virtual(main())
    assert after[0] <= 1.0 + 1e-6 and len([t for t in after if t <= 6.0]) >= 5, after  # every second again


def test_an_engine_going_idle_at_a_steps_end_opens_the_tail_only_while_another_holds_work():
    assert tail_opened(frozenset({0}), frozenset(), backlog=0, crowded=True)
    assert not tail_opened(frozenset({0}), frozenset({0}), backlog=0, crowded=True)  # idle at the last look too
    assert not tail_opened(frozenset({0}), frozenset(), backlog=3, crowded=True)  # routing gives it queued work
    assert not tail_opened(frozenset({0}), frozenset(), backlog=0, crowded=False)  # nothing left worth moving


def test_an_engine_going_idle_while_another_holds_work_brings_the_next_look_at_once():
    """A quiet monitor (8 s) would let a short step's whole tail pass unseen; the tail spread acts on a look."""
    async def main():
        fast, slow = Counting("a"), Counting("b")
        loop = asyncio.get_running_loop()
        ctl = ControllerConfig(expected_tokens=64)
        async with RolloutPool(pool=PoolConfig(per_engine=8, over_concurrency_ratio=1.0), controller=ctl,
                               clients=[fast, slow], clock=loop.time) as pool:  # caps of 8: 8 on each engine
            await asyncio.sleep(60.0)
            assert pool.monitor.wait_s == ctl.quiet_interval_s  # backed off: nothing to decide
            looks = slow.looks
            while slow.looks == looks:  # virtual time: until the next look, then half a second on
                await asyncio.sleep(0.25)
            await asyncio.sleep(0.5)
            fast.gate, slow.gate = asyncio.Event(), asyncio.Event()
            task = asyncio.ensure_future(pool.generate([Request(f"r{i}", "p") for i in range(16)]))
            await asyncio.sleep(1.5)  # a poll sees both engines busy
            assert fast.inflight > 0 and slow.inflight >= 2, (fast.inflight, slow.inflight)
            fast.gate.set()
            opened = loop.time()
            await asyncio.sleep(3.0)
            slow.gate.set()
            assert all(r.ok for r in await task)
        return [t - opened for t in slow.at if t > opened]

    after = run_virtual(main())
    assert after and after[0] <= 1.0 + 1e-6, after  # not ~6 s later, when the quiet period would have ended
