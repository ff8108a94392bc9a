"""Weight updates that neither wait nor waste, and engines that hold the weights their results say.

On virtual time against :class:`vllm_like.VllmLike` (vLLM's RL control API in memory), whose every
token encodes the weights that produced it: each sample's segments are checked against its tokens.
The same modes run against the real vLLM CPU engine in tests/test_weight_modes_engine.py.
"""

from __future__ import annotations

import asyncio

import pytest

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.errors import EngineError
from rollout_plugin.pool.engines.launcher import EngineEndpoint
from rollout_plugin.pool import require_ok
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.weights.sources import FolderWeights
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request, SamplingParams
from vllm_like import VllmLike

FOLDERS = {"w0": 0, "w1": 1, "w2": 2}


def engines(count: int, **kw) -> list[VllmLike]:
    out = [VllmLike(f"e{i}", **kw) for i in range(count)]
    for e in out:
        e.folders = FOLDERS
    return out


def pool_of(clients, **cfg) -> RolloutPool:
    loop = asyncio.get_running_loop()
    return RolloutPool(pool=PoolConfig(**{"per_engine": 16, "over_concurrency_ratio": 1.0, "pack_size": 4, **cfg}),
                       controller=ControllerConfig(mode=ControllerMode.off), clients=clients, clock=loop.time)


def requests(count: int, n: int = 2, tokens: int = 40) -> list[Request]:
    return [Request(f"r{i}", [100 + i], n=n, sampling=SamplingParams(max_tokens=tokens)) for i in range(count)]


def check_segments(result) -> None:
    """Every token's weights (encoded in it) are what its segment says; spans are contiguous."""
    for s in result.samples:
        assert s.token_ids is not None and len(s.token_ids) == 40
        assert s.segments[0].start == 0 and s.segments[-1].end == 40
        for seg in s.segments:
            assert {t // 1000 for t in s.token_ids[seg.start:seg.end]} == {seg.version}, (s.segments, s.token_ids)
        # positions 0..39 in order: nothing lost, nothing doubled, wherever it continued
        assert [t % 1000 for t in s.token_ids] == list(range(40))


async def update_midway(pool: RolloutPool, mode: str, version: int = 1) -> list:
    task = asyncio.ensure_future(pool.generate(requests(6)))
    await asyncio.sleep(0.2)  # 20 of 40 tokens in
    await pool.update_weights(version, FolderWeights(f"w{version}"), mode=mode)
    return await task


@pytest.mark.parametrize("mode", ["keep", "continue"])
def test_keep_and_continue_lose_nothing_and_record_which_weights_made_which_tokens(mode):
    async def main():
        es = engines(2)
        async with pool_of(es) as pool:
            results = await update_midway(pool, mode)
            assert pool.weight_version == 1
        for r in results:
            assert r.ok
            check_segments(r)
            assert all(s.versions == (0, 1) for s in r.samples)  # every sample spans the update
            assert r.weight_version == 0  # the oldest version in it
        kept = sum(len(s.token_ids) for r in results for s in r.samples)
        assert sum(e.generated for e in es) == kept  # no generated token thrown away
    run_virtual(main())


def test_drain_waits_and_restart_regenerates():
    async def main():
        for mode in ("drain", "restart"):
            es = engines(2)
            async with pool_of(es) as pool:
                results = await update_midway(pool, mode)
            kept = sum(len(s.token_ids) for r in results for s in r.samples)
            for r in results:
                check_segments(r)
                assert {s.versions for s in r.samples} == {(0,) if mode == "drain" else (1,)}
            wasted = sum(e.generated for e in es) - kept
            assert (wasted == 0) if mode == "drain" else (wasted > 0)
    run_virtual(main())


def test_results_carry_the_version_each_engine_reports():
    async def main():
        es = engines(2)
        async with pool_of(es) as pool:
            await pool.update_weights(2, FolderWeights("w2"))
            results = await pool.generate(requests(4))
        assert [e.version for e in es] == ["2", "2"]
        assert all(r.weight_version == 2 and {t // 1000 for s in r.samples for t in s.token_ids} == {2}
                   for r in results)
    run_virtual(main())


def test_a_checksum_mismatch_names_the_engine():
    async def main():
        es = engines(2)
        es[1].folders = {"w1": 7}  # reads another folder: other weights under the same version
        async with pool_of(es) as pool:
            with pytest.raises(EngineError, match=r"e1: weight checksums differ from e0's"):
                await pool.update_weights(1, FolderWeights("w1"))
    run_virtual(main())


class Restarts:
    """A backend whose engines restart as fresh processes holding the initial weights."""

    startup_s: list[float] = []

    def __init__(self, fresh):
        self.fresh = fresh

    async def replace(self, index: int) -> EngineEndpoint:
        return EngineEndpoint(f"e{index}", f"http://restarted-{index}", None)

    async def watch(self, on_dead, on_capacity):
        return None

    def can_grow(self, engines: int) -> bool:
        return False

    def close(self) -> None:
        pass


@pytest.mark.parametrize("with_source", [True, False])
def test_a_restarted_engine_stays_out_until_refit(with_source):
    async def main():
        es = engines(2)
        fresh = []

        def factory(name, url, **_):
            e = VllmLike(name)  # a new process: initial weights (0), version "default"
            e.folders, e.model = FOLDERS, "m"
            fresh.append(e)
            return e

        pool = RolloutPool(pool=PoolConfig(per_engine=16, pack_size=4, max_restarts=1),
                           controller=ControllerConfig(mode=ControllerMode.off), clients=es,
                           clock=asyncio.get_running_loop().time, client_factory=factory)
        pool.provider = Restarts(factory)
        for e in es:
            e.model = "m"
        async with pool:
            if with_source:
                await pool.update_weights(1, FolderWeights("w1"))
            else:
                async with pool.weight_update(1):
                    require_ok(await pool.engine_rpc("/collective_rpc", {"method": "reload_weights",
                                                                         "kwargs": {"weights_path": "w1"}}))
            es[0].dead = True
            pool._dispatcher.mark_dead(0, "test: killed")
            for _ in range(200):  # the restart runs as a supervised helper
                await asyncio.sleep(0.01)
                if fresh and (not with_source or pool.stats().engines[0].healthy):
                    break
            results = await pool.generate(requests(6))
            healthy = [e.healthy for e in pool.stats().engines]
        assert fresh, "the pool did not restart the engine"
        tokens = {t // 1000 for r in results for s in r.samples for t in s.token_ids}
        assert tokens == {1} and all(r.weight_version == 1 for r in results)  # never the initial weights
        if with_source:
            assert healthy == [True, True] and fresh[0].weights == 1 and fresh[0].version == "1"
        else:
            assert healthy == [False, True] and fresh[0].weights == 0  # stale: out, and it says so
    run_virtual(main())


def test_max_staleness_restarts_samples_that_span_too_many_versions():
    async def main():
        es = engines(1)
        async with pool_of(es) as pool:
            task = asyncio.ensure_future(pool.generate(requests(2, tokens=40)))
            await asyncio.sleep(0.1)
            await pool.update_weights(1, FolderWeights("w1"), mode="keep")
            await asyncio.sleep(0.1)
            await pool.update_weights(2, FolderWeights("w2"), mode="keep", max_staleness=1)
            results = await task
        for r in results:
            check_segments(r)
            assert all(min(s.versions) >= 1 for s in r.samples)  # nothing from version 0 survived
    run_virtual(main())


def test_step_quota_returns_whole_groups_first_done_and_carries_the_rest_across_updates():
    async def main():
        es = engines(2)
        # lengths 10..80: the long groups would hold every step up; with the quota they carry over
        reqs = [Request(f"g{i}", [100 + i], n=4, sampling=SamplingParams(max_tokens=10 + 10 * (i % 8)))
                for i in range(40)]
        steps_seen: list[list] = []
        async with pool_of(es, per_engine=32) as pool:
            async with pool.steps(reqs, in_flight=12) as steps:
                for step in range(4):
                    groups = await steps.next(8)
                    assert len(groups) == 8 and all(len(g.samples) == 4 for g in groups)  # whole groups
                    steps_seen.append(groups)
                    await pool.update_weights(step + 1, FolderWeights(f"w{min(step + 1, 2)}"), mode="continue",
                                              max_staleness=1)
                assert steps.carried > 0  # some groups were still running at each step's end
        ids = [g.id for groups in steps_seen for g in groups]
        assert len(ids) == len(set(ids)) == 32  # nothing lost or duplicated across steps
        spanning = [s for groups in steps_seen[1:] for g in groups for s in g.samples if len(s.versions) > 1]
        assert spanning  # carried groups finished under newer weights, keeping their first tokens
        for step, groups in enumerate(steps_seen):
            for g in groups:
                for s in g.samples:
                    assert min(s.versions) >= step - 1  # max_staleness=1: at most one version behind
                    for seg in s.segments:
                        assert {t // 1000 for t in s.token_ids[seg.start:seg.end]} == {min(seg.version, 2)}
    run_virtual(main())


def test_continue_does_not_wait_for_a_call_that_reached_the_paused_engine_after_the_abort():
    async def main():
        es = engines(2, latency_s=0.05)  # calls take 50 ms to reach their engine
        async with pool_of(es) as pool:
            task = asyncio.ensure_future(pool.generate(requests(6)))
            await asyncio.sleep(0.01)  # admitted, not yet at the engine: vLLM will queue them until /resume
            await asyncio.wait_for(pool.update_weights(1, FolderWeights("w1"), mode="continue"), 30)
            results = await asyncio.wait_for(task, 30)
        for r in results:
            check_segments(r)
            assert {s.versions for s in r.samples} == {(1,)}  # they never started under the old weights
    run_virtual(main())
