"""The simulator's prefix cache (issue 23): vLLM's hashed, chained, LRU-evicted blocks, what a hit saves, and the
hit rate that measures routing (hits ÷ tokens some engine had already computed)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest

from rollout_plugin.errors import SimulationError
from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics
from rollout_plugin.sim.client import SimEngineClient
from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.engine import CachedPrompt, SimEngine
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.sim.prefix_cache import PrefixCache, Reused, block_ids, output_segment
from rollout_plugin.sim.profile import EngineProfile, StepModel
from rollout_plugin.sim.runner import cache_figures, simulate
from rollout_plugin.sim.workload import build_sessions

STEP = StepModel(base_s=0.01, per_seq_s=0.001, per_ctx_token_s=0.0, per_prefill_token_s=0.0)
PROFILE = EngineProfile("test", STEP, kv_tokens=100_000, max_num_seqs=64, max_num_batched_tokens=8192)


def _cycle(cache: PrefixCache, content) -> list[int]:
    """A request that holds ``content``'s blocks and ends."""
    ids = block_ids(content, cache.block_size)
    cache.acquire(ids)
    cache.release(ids)
    return ids


def test_eviction_takes_the_least_recently_freed_block_and_a_chain_tail_before_its_head():
    cache = PrefixCache(block_size=4)
    a = _cycle(cache, (("a", 8),))
    b = _cycle(cache, (("b", 8),))
    assert list(cache.free) == [a[1], a[0], b[1], b[0]]  # freed tail first, as vLLM frees reversed(blocks)
    _cycle(cache, (("a", 8),))  # a hit makes ``a`` the most recently freed again
    cache.trim(3)
    assert list(cache.free) == [b[0], a[1], a[0]] and cache.evictions == 1  # b's tail went first
    cache.trim(2)
    assert list(cache.free) == [a[1], a[0]]
    held = block_ids((("c", 4),), 4)
    cache.acquire(held)
    cache.trim(0)
    assert held[0] in cache and not cache.free  # a block a running sequence holds is never evicted


def test_block_identity_chains_its_prefix():
    tail_after_x = block_ids((("x", 8), ("t", 8)), 4)
    tail_after_y = block_ids((("y", 8), ("t", 8)), 4)
    assert len(tail_after_x) == 4 and not set(tail_after_x) & set(tail_after_y)  # same tail, other prefix: a miss
    assert block_ids((("x", 8),), 4) == tail_after_x[:2]  # a prompt's blocks are a prefix of its extension's
    assert block_ids((("x", 10),), 4) == tail_after_x[:2]  # a partial last block has no identity
    assert block_ids((("x", 3), ("t", 5)), 4) == block_ids((("x", 3), ("t", 6)), 4)  # blocks across segments
    cache = PrefixCache(block_size=4)
    _cycle(cache, (("x", 8), ("t", 8)))
    assert cache.lookup(tail_after_y, 17) == 0
    assert cache.lookup(tail_after_x, 17) == 16
    assert cache.lookup(tail_after_x, 16) == 12  # the last prompt token is always computed (vLLM: num_tokens - 1)


def _turn_time(cached: bool) -> tuple[float, SimEngine]:
    """A session's second turn on the engine that ran its first: how long it takes."""
    per_token = 1e-3
    profile = replace(PROFILE, step=replace(STEP, per_prefill_token_s=per_token))
    first = ((("prompt", 0), 1000),)
    second = first + ((output_segment("t0", 0), 10), (("tool", 0), 64))

    async def main():
        engine = SimEngine("e", profile, prefix_cache=PrefixCache(16) if cached else None)
        loop = asyncio.get_running_loop()
        await engine.submit([1000], [[10]], [CachedPrompt("t0", first, 1000, 1)]).future
        t0 = loop.time()
        await engine.submit([1074], [[10]], [CachedPrompt("t1", second, 1074, 1)]).future
        return loop.time() - t0, engine

    return run_virtual(main())


def test_a_hit_skips_its_blocks_prefill():
    hit, engine = _turn_time(cached=True)
    miss, _ = _turn_time(cached=False)
    # 1,000 prompt + 10 answer tokens were computed: 63 full blocks (1,008 tokens) are found, 66 are prefilled.
    assert engine.cache.hits == 1008 and engine.cache.queries == 1000 + 1074
    assert miss - hit == pytest.approx(1008 * 1e-3)
    assert engine.prompt_tokens == 1000 + 1074 - 1008


def test_hit_rate_is_hits_over_what_any_engine_had_computed():
    reused = Reused()
    e0, e1 = PrefixCache(16, reused), PrefixCache(16, reused)
    prompt = (("p", 65),)  # 4 usable blocks
    ids = block_ids(prompt, 16)
    assert e0.lookup(ids, 65) == 0  # nobody had computed it: not reusable
    e0.acquire(ids)
    assert e1.lookup(ids, 65) == 0  # computed on e0, looked for on e1: reusable, missed
    e1.acquire(ids)
    e0.release(ids)
    assert e0.lookup(ids, 65) == 64  # found where it was computed
    other = block_ids((("q", 65),), 16)
    e1.lookup(other, 65)
    figures = cache_figures([SimpleNamespace(cache=e0), SimpleNamespace(cache=e1), SimpleNamespace(cache=None)])
    assert figures["prefix_cache_queries"] == 4 * 65
    assert (figures["prefix_cache_hits"], figures["prefix_cache_reusable"]) == (64, 128)
    assert figures["prefix_cache_hit_rate"] == 0.5


def _multi_turn_cfg() -> SimulateConfig:
    cfg = SimulateConfig()
    cfg.workload = replace(cfg.workload, prompts_per_engine=None, prompts=16, k=4, turns=3, tool_latency_s=0.5,
                           prompt_tokens_median=256, output_tokens_median=60, max_tokens=256, chat=False)
    return cfg


def test_sticky_sessions_find_their_prefix_where_a_cache_unaware_balancer_does_not():
    cfg = _multi_turn_cfg()
    sessions = build_sessions(cfg.workload, 16)
    sticky = simulate(Policy.verl, 8, PROFILE, cfg, sessions)
    unaware = simulate(Policy.least_loaded, 8, PROFILE, cfg, sessions)
    assert sticky.output_tokens == unaware.output_tokens and sticky.failed == unaware.failed == 0
    assert sticky.prefix_cache_queries == unaware.prefix_cache_queries > 0
    # Both see the same reusable prefixes (every turn after the first resends its session's); only sticky finds them.
    assert sticky.prefix_cache_hit_rate > unaware.prefix_cache_hit_rate + 0.3, (sticky, unaware)
    assert sticky.prefix_cache_hit_rate > 0.7


def test_without_shared_prefixes_or_without_the_cache_nothing_changes():
    cfg = _multi_turn_cfg()
    sessions = build_sessions(cfg.workload, 16)
    on = simulate(Policy.verl, 4, PROFILE, cfg, sessions)
    cfg.fleet = replace(cfg.fleet, prefix_cache=False)
    off = simulate(Policy.verl, 4, PROFILE, cfg, sessions)
    assert off.prefix_cache_hit_rate is None and off.prefix_cache_queries == 0
    assert on.makespan_s == off.makespan_s  # a free prefill (per_prefill_token_s=0): hits change nothing
    slow = replace(PROFILE, step=replace(STEP, per_prefill_token_s=1e-4))
    assert simulate(Policy.verl, 4, slow, cfg, sessions).makespan_s > simulate(
        Policy.verl, 4, slow, _multi_turn_cfg(), sessions).makespan_s  # with a cost, the hits save it
    single = SimulateConfig()
    single.workload = replace(single.workload, prompts_per_engine=None, prompts=32, k=4, output_tokens_median=60,
                              max_tokens=256)
    groups = build_sessions(single.workload, 32)
    cached = simulate(Policy.static, 4, slow, single, groups)
    single.fleet = replace(single.fleet, prefix_cache=False)
    assert cached.prefix_cache_hits == 0 and cached.prefix_cache_hit_rate is None  # distinct prompts: no reuse
    assert simulate(Policy.static, 4, slow, single, groups).makespan_s == cached.makespan_s


def test_a_weight_update_empties_the_prefix_cache():
    async def main():
        engine = SimEngine("e", PROFILE, prefix_cache=PrefixCache(16, Reused()))
        client = SimEngineClient(engine)
        prompt = CachedPrompt("r", (("p", 100),), 100, 1)
        await engine.submit([100], [[20]], [prompt]).future
        assert engine.cache.free and engine.cache.peek(prompt.block_ids(16), 100) == 96
        await client.admin("/reset_prefix_cache")  # what a weight update sends (rlrun, pool.update_weights)
        assert not engine.cache.free and not engine.cache.refs
        again = CachedPrompt("r2", (("p", 100),), 100, 1)
        await engine.submit([100], [[20]], [again]).future
        return engine.cache

    cache = run_virtual(main())
    assert cache.hits == 0 and cache.reusable == 0  # the old weights' blocks are not reusable either


def test_metrics_carry_vllms_prefix_cache_counters():
    async def main():
        engine = SimEngine("e", PROFILE, prefix_cache=PrefixCache(16))
        client = SimEngineClient(engine)
        for rid in ("a", "b"):
            await engine.submit([100], [[5]], [CachedPrompt(rid, (("p", 100),), 100, 1)]).future
        return await client.metrics()

    text = run_virtual(main())
    assert 'vllm:prefix_cache_queries_total{model_name="sim"} 200.0' in text
    assert 'vllm:prefix_cache_hits_total{model_name="sim"} 96.0' in text
    assert parse_vllm_metrics(str(text)) == text.parsed  # the series the monitor reads are unchanged


def test_a_sequence_running_across_a_reset_caches_only_what_the_new_weights_computed():
    async def main():
        engine = SimEngine("e", PROFILE, prefix_cache=PrefixCache(16, Reused()))
        call = engine.submit([100], [[400]], [CachedPrompt("r", (("p", 100),), 100, 1)])
        await asyncio.sleep(0.5)
        engine.invalidate_cache()  # running: re-prefilled under the new weights (the sim's reset preempts it)
        assert engine.cache.epoch == 1 and not engine.cache.free
        await call.future
        return engine

    engine = run_virtual(main())
    assert engine.recomputed_tokens > 0
    assert engine.cache.peek(block_ids((("p", 100),), 16), 100) == 96  # its re-prefill is cached again
    assert not engine.cache.refs  # nothing leaks a reference


def test_a_kv_budget_smaller_than_the_working_set_evicts():
    cfg = _multi_turn_cfg()
    sessions = build_sessions(cfg.workload, 16)
    roomy = simulate(Policy.verl, 4, PROFILE, cfg, sessions)
    cfg.fleet = replace(cfg.fleet, kv_tokens=4096)
    tight = simulate(Policy.verl, 4, PROFILE, cfg, sessions)
    assert roomy.prefix_cache_evictions == 0 < tight.prefix_cache_evictions
    assert tight.prefix_cache_hit_rate < roomy.prefix_cache_hit_rate
    cfg.fleet = replace(cfg.fleet, kv_tokens=8)
    with pytest.raises(SimulationError, match=r"fleet.kv_tokens=8: less than one KV block .* at least 16"):
        simulate(Policy.verl, 4, PROFILE, cfg, sessions)
