"""Multi-turn sessions in the pool (issue 23): no session waits for another; the session map is bounded, freed
when a session ends, expires, and survives an engine's death by moving one key at a time.

Engine time is virtual (``rollout_plugin.sim.loop.run_virtual``): no sleeps, hours pass in microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fakes import FakeEngine
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.config.validate import Problems, check_pool
from rollout_plugin.errors import ConfigError
from rollout_plugin.pool import RolloutPool, SyncRolloutPool
from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.engine_client import Generation, Unavailable
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request, Sample, SamplingParams


class TimedEngine(FakeEngine):
    """Each request decodes for ``metadata["seconds"]`` of (virtual) time, and a call answers when its slowest
    request ends, as a non-streamed multi-prompt ``/v1/completions`` does: vLLM drains every prompt's generator
    into ``final_res_batch`` before it builds the one response (vllm/entrypoints/openai/completion/serving.py,
    ``merge_async_iterators``). A dead engine refuses the connection."""

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        self.calls.append([r.id for r in requests])
        if self.dead:
            raise Unavailable(f"{self.name}: connection refused")
        samples = sum(r.n for r in requests)
        self.inflight += samples
        try:
            await asyncio.sleep(max(r.metadata.get("seconds", 0.0) for r in requests))
        finally:
            self.inflight -= samples
        return [Generation(tuple(Sample(f"{r.id}:{j}", (1, 2, 3), None, "length") for j in range(r.n)), 3)
                for r in requests]


def turn(rid: str, key: str | tuple[str, ...] | None, seconds: float, prompt: object = "the context so far") -> Request:
    return Request(rid, prompt, sampling=SamplingParams(max_tokens=16), affinity=key, metadata={"seconds": seconds})


def pool_of(engines: list[FakeEngine], **cfg: object) -> RolloutPool:
    return RolloutPool(pool=PoolConfig(**cfg), controller=ControllerConfig(mode=ControllerMode.off),
                       clients=engines, clock=asyncio.get_running_loop().time)


async def finish_times(pool: RolloutPool, requests: list[Request]) -> dict[str, float]:
    """When each request's result arrived, seconds after they were all submitted together."""
    loop = asyncio.get_running_loop()
    start, done = loop.time(), {}

    async def one(r: Request) -> None:
        result = await pool.submit(r)
        assert result.ok, result.error
        done[r.id] = loop.time() - start

    await asyncio.gather(*(one(r) for r in requests))
    return done


# --- 1. no session waits for another ----------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["text turn", [11, 12, 13]], ids=["text", "token-ids"])
def test_turns_of_two_sessions_go_in_separate_calls_and_a_short_turn_does_not_wait_for_a_long_one(prompt):
    async def main():
        engine = TimedEngine("e0")
        async with pool_of([engine], per_engine=16, pack_size=64) as pool:
            done = await finish_times(pool, [turn("a1", ("session:a", "group:g"), 10.0, prompt),
                                             turn("b1", ("session:b", "group:g"), 1.0, prompt)])
        return engine.calls, done

    calls, done = run_virtual(main())
    assert sorted(calls) == [["a1"], ["b1"]]  # same prompt kind, n and params, yet never one call
    assert done["b1"] == pytest.approx(1.0, abs=1e-3) and done["a1"] == pytest.approx(10.0, abs=1e-3)


def test_without_an_affinity_key_the_same_turns_pack_and_the_short_one_waits():
    """The control for the test above: the pool cannot tell turns without a key from independent prompts, packs
    them, and the short one resolves with the long one (why session turns must carry their key)."""
    async def main():
        engine = TimedEngine("e0")
        async with pool_of([engine], per_engine=16, pack_size=64) as pool:
            done = await finish_times(pool, [turn("a1", None, 10.0), turn("b1", None, 1.0)])
        return engine.calls, done

    calls, done = run_virtual(main())
    assert [sorted(c) for c in calls] == [["a1", "b1"]]
    assert done["b1"] == pytest.approx(10.0, abs=1e-3)


def test_samples_of_one_key_still_pack_together():
    """A GRPO group sent sample by sample shares one key: its samples still ride one call (one prefill)."""
    async def main():
        engine = TimedEngine("e0")
        async with pool_of([engine], per_engine=16, pack_size=64) as pool:
            await finish_times(pool, [turn(f"g{i}", "group:g", 1.0 + i) for i in range(4)])
        return engine.calls

    assert [sorted(c) for c in run_virtual(main())] == [["g0", "g1", "g2", "g3"]]


# --- 2. the session map: bounded, freed, expired, moved --------------------------------------------
def test_100k_sessions_through_the_map_keep_it_within_its_bound():
    a = Affinity(max_keys=1_000)
    for i in range(100_000):  # a session's first turn: its own key and its group's (8 sessions a group)
        keys = (f"session:{i}", f"group:{i // 8}")
        a.placed(keys, i % 4, 1, now=float(i))
        if i % 2:
            a.left(keys, i % 4, 1)
        assert len(a) <= 1_000
    assert len(a._used) == len(a._home) == 1_000 and len(a._on_home) <= 1_000
    assert a.evicted == 100_000 + 100_000 // 8 - 1_000
    assert a.home("session:99999") == (3, 0) and a.home("session:0") == (None, 0)  # the oldest went first


def test_an_ended_session_is_freed_and_the_pool_says_so():
    a = Affinity()
    a.placed(("session:x", "group:1"), 2, 1)
    a.placed(("session:y", "group:1"), 2, 1)
    assert a.end("session:x") and a.home("session:x") == (None, 0) and len(a) == 2
    assert not a.end("session:x")  # ended already
    assert a.home(("session:y", "group:1")) == (2, 1)  # the rest stays

    async def main():
        async with pool_of([TimedEngine("e0"), TimedEngine("e1")], per_engine=4) as pool:
            await finish_times(pool, [turn("t1", ("session:x", "group:1"), 1.0)])
            before = pool.affinity_keys
            ended = pool.end_session("session:x"), pool.end_session("session:x"), pool.end_session("never")
            return before, ended, pool.affinity_keys

    assert run_virtual(main()) == (2, (True, False, False), 1)


def test_a_home_unused_for_its_ttl_expires_but_not_while_its_turn_runs():
    a = Affinity(ttl_s=60.0)
    a.placed("session:old", 0, 1, now=0.0)
    a.left("session:old", 0, 1)
    a.placed("session:running", 1, 1, now=0.0)  # its turn runs past the TTL
    a.placed("session:new", 1, 1, now=50.0)
    a.left("session:new", 1, 1)
    assert a.home("session:old", now=61.0) == (None, 0)  # past its TTL: no home, even before a sweep
    assert a.home("session:old", now=59.0) == (0, 0)
    assert a.expire(61.0) == 1 and len(a) == 2
    assert a.home("session:running", now=200.0) == (1, 1)  # in flight: kept, its clock restarted at 61 s
    a.left("session:running", 1, 1)
    assert a.expire(120.0) == 1 and a.home("session:running", now=120.0) == (1, 0)  # session:new went
    assert a.expire(122.0) == 1 and len(a) == 0 and a.expired == 3
    a.placed("session:old", 2, 1, now=130.0)  # an expired key's next turn starts afresh
    assert a.home("session:old", now=130.0) == (2, 1)


def test_a_dead_engines_session_moves_home_on_its_next_turn_and_the_rest_of_the_map_stays():
    async def main():
        engines = [TimedEngine(f"e{i}") for i in range(3)]
        async with pool_of(engines, per_engine=8, over_concurrency_ratio=1.0, max_retries=3) as pool:
            affinity = pool._require().affinity
            await finish_times(pool, [turn("a1", "session:a", 1.0), turn("b1", "session:b", 1.0)])
            homes = affinity.home("session:a")[0], affinity.home("session:b")[0]
            engines[0].dead = True
            await finish_times(pool, [turn("a2", "session:a", 1.0)])  # fails on e0, which is found dead
            moved_to = engines.index(next(e for e in engines if ["a2"] in e.calls and not e.dead))
            # A long call of session b makes its engine a little busier (1/8, under the 0.25 gate) than e2.
            busy = pool.submit(turn("b2", "session:b", 100.0))  # queued first: admitted first
            third = await pool.submit(turn("a3", "session:a", 1.0))
            assert (await busy).engine == "e1"
            return homes, moved_to, third.engine, affinity.home("session:b")[0], affinity.rehomed, affinity.moved

    homes, moved_to, third, b_home, rehomed, moved = run_virtual(main())
    assert homes == (0, 1) and moved_to == 1
    assert third == "e1"  # its new home, where its prefix now is (not wherever is least loaded: e2)
    assert b_home == 1 and rehomed == 1 and moved == 0


def test_the_pool_takes_its_bound_and_ttl_from_config_and_refuses_bad_ones():
    async def main():
        async with pool_of([TimedEngine("e0")], per_engine=64, affinity_max_keys=10, affinity_ttl_s=5.0) as pool:
            await finish_times(pool, [turn(f"s{i}", f"session:{i}", 1.0) for i in range(50)])
            bounded = pool.affinity_keys
            await asyncio.sleep(10.0)  # virtual: the homes' TTL passes
            await finish_times(pool, [turn("late", "session:late", 0.0)])
            return bounded, pool.affinity_keys

    assert run_virtual(main()) == (10, 1)
    p = Problems()
    check_pool(PoolConfig(affinity_max_keys=0, affinity_ttl_s=0.0), p)
    with pytest.raises(ConfigError) as err:
        p.raise_if_any()
    text = str(err.value)
    assert "pool.affinity_max_keys=0: must be >= 1" in text
    assert "pool.affinity_ttl_s=0.0: must be > 0 seconds, or null for homes that never expire" in text


def test_the_blocking_pool_ends_a_session_on_its_own_loop():
    with SyncRolloutPool(pool=PoolConfig(per_engine=4), controller=ControllerConfig(mode=ControllerMode.off),
                         clients=[FakeEngine("e0")]) as pool:
        assert pool.generate([Request("t1", "turn", affinity="session:x")])[0].ok
        assert pool.end_session("session:x") and not pool.end_session("session:x")
