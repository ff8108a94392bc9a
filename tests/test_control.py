"""The adaptive controller (pure, fake clock) and the monitor loop against in-memory engines."""

from __future__ import annotations

import asyncio
import json

from fakes import FakeEngine
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.pool.control import Observation, initial_state, kv_estimate_cap, step
from rollout_plugin.pool.pool import RolloutPool
from rollout_plugin.pool.telemetry import parse_vllm_metrics
from rollout_plugin.types import Request

CFG = ControllerConfig()


def run(state, observations, cfg=CFG):
    decisions = []
    for obs in observations:
        state, decision = step(state, obs, cfg)
        decisions.append(decision)
    return state, decisions


def busy(t, tokens, inflight=100, backlog=500, **kw):
    return Observation(t=t, inflight=inflight, backlog=backlog, tokens_total=tokens, **kw)


def test_raises_while_throughput_rises_then_holds_at_the_plateau():
    state = initial_state(100, CFG, group_size=1)
    # tokens/s: 1000, 1500 (rose: raise), 1520 (+1.3 %: plateau, hold), then flat
    obs = [busy(0, 0), busy(1, 1000), busy(2, 2500, inflight=125), busy(3, 4020, inflight=156),
           busy(4, 5540, inflight=156), busy(5, 7060, inflight=156)]
    state, decisions = run(state, obs)
    caps = [d.cap for d in decisions]
    assert caps == [100, 125, 157, 157, 157, 157]
    assert "rising" in decisions[1].reason and state.plateau


def test_never_raises_when_the_engine_queues_or_the_pool_is_empty():
    state = initial_state(100, CFG, group_size=1)
    _, d = run(state, [busy(0, 0), busy(1, 1000, waiting=5)])
    assert [x.cap for x in d] == [100, 100]
    _, d = run(state, [busy(0, 0), busy(1, 1000, backlog=0)])
    assert [x.cap for x in d] == [100, 100]
    _, d = run(state, [busy(0, 0), busy(1, 1000, inflight=10)])  # not cap-bound
    assert [x.cap for x in d] == [100, 100]


def test_cuts_on_preemptions_and_on_kv_pressure_but_not_below_a_group():
    state = initial_state(100, CFG, group_size=8)
    state, d = run(state, [busy(0, 0, preemptions_total=0), busy(1, 900, preemptions_total=3)])
    assert d[1].cap == 70 and d[1].reason == "preemptions +3"
    state, d = run(state, [busy(2, 1800, preemptions_total=3, kv_usage=0.99)])
    assert d[0].cap == 49 and "KV usage 99%" in d[0].reason
    for t in range(3, 20):
        state, _ = step(state, busy(t, 900 * t, preemptions_total=float(t)), CFG)
    assert state.cap == 8  # the floor: one GRPO group always fits


def test_caps_respect_the_configured_ceiling():
    cfg = ControllerConfig(max_cap=110)
    state = initial_state(100, cfg, group_size=1)
    _, d = run(state, [busy(0, 0), busy(1, 1000)], cfg)
    assert d[1].cap == 110


def test_a_low_kv_first_guess_may_still_climb_to_twice_the_preset():
    state = initial_state(5, ControllerConfig(), group_size=1, preset=128)
    assert (state.cap, state.ceiling) == (5, 256)  # not 2 × 5: the estimate is only where to start


def test_off_mode_observes_but_never_changes_caps():
    cfg = ControllerConfig(mode=ControllerMode.off)
    state = initial_state(100, cfg, group_size=1)
    state, d = run(state, [busy(0, 0, preemptions_total=0), busy(1, 1000, preemptions_total=9)], cfg)
    assert all(not x.changed for x in d) and state.throughput == 1000


def test_kv_estimate_only_lowers_the_preset():
    assert kv_estimate_cap(1024, 1024, 256, 1.2) == (5, "KV holds 1024 tokens = 4 sequences of 256 tokens (×1.2)")
    assert kv_estimate_cap(64, 10**7, 256, 1.2)[0] == 64
    assert kv_estimate_cap(64, None, 256, 1.2)[0] == 64


METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 4.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="64",engine="0"} 1.0
"""


def test_parse_vllm_metrics():
    m = parse_vllm_metrics(METRICS)
    assert (m.running, m.waiting, m.kv_usage, m.preemptions_total, m.generation_tokens_total, m.kv_tokens) == (
        7, 2, 0.5, 4.0, 1234.0, 1024)
    assert parse_vllm_metrics("garbage {{{").running is None


async def test_monitor_applies_the_kv_estimate_and_records_a_timeline(tmp_path):
    engine = FakeEngine("a")
    engine.metrics_text = METRICS
    timeline = tmp_path / "t.jsonl"
    ctl = ControllerConfig(expected_tokens=256, timeline=str(timeline))
    async with RolloutPool(pool=PoolConfig(per_engine=64), controller=ctl, clients=[engine]) as pool:
        async with asyncio.timeout(5):
            while pool.monitor.states is None:
                await asyncio.sleep(0)
        assert pool.stats().engines[0].cap == 5  # 64 blocks × 16 = 1024 tokens = 4 × 256, × 1.2
        results = await pool.generate([Request(f"r{i}", "p") for i in range(20)])
    assert all(r.ok for r in results) and engine.peak <= 5
    kinds = [json.loads(line)["kind"] for line in timeline.read_text().splitlines()]
    assert kinds[0] == "meta" and "cap" in kinds and "sample" in kinds


async def test_pool_exports_namespaced_prometheus_metrics():
    engine = FakeEngine("a")
    engine.metrics_text = METRICS
    async with RolloutPool(pool=PoolConfig(per_engine=64), controller=ControllerConfig(expected_tokens=256),
                           clients=[engine]) as pool:
        await pool.generate([Request(f"r{i}", "p") for i in range(10)])
        async with asyncio.timeout(5):
            while pool.monitor.states is None:
                await asyncio.sleep(0)
        pool.monitor.observe([parse_vllm_metrics(METRICS)])
        text = pool.metrics_text()
    assert 'rollout_pool_results_total{engine="a",outcome="ok"} 10.0' in text
    assert 'rollout_pool_output_tokens_total{engine="a"} 40.0' in text
    assert 'rollout_pool_cap_samples{engine="a"} 5.0' in text and 'rollout_pool_engine_kv_usage{engine="a"} 0.5' in text
    assert 'rollout_pool_call_latency_seconds_count{engine="a"}' in text
    assert 'rollout_pool_cap_changes_total{direction="down",engine="a"} 1.0' in text


def test_after_kv_pressure_raises_stop_below_the_cap_that_met_it():
    state = initial_state(100, ControllerConfig(max_cap=1000), group_size=1)
    cfg = ControllerConfig(max_cap=1000)
    state, d = run(state, [busy(0, 0), busy(1, 1000, inflight=100, kv_usage=0.99)], cfg)
    assert d[1].cap == 70
    tokens, t, caps = 1000, 1, []
    for rate in (1100, 1300, 1600, 2000, 2500, 3100):  # throughput keeps rising: the controller wants more
        t, tokens = t + 1, tokens + rate
        state, dec = step(state, busy(t, tokens, inflight=state.cap), cfg)
        caps.append(dec.cap)
    assert max(caps) == 99 and caps[-1] == 99  # probes back up, never to 100 again


async def test_monitor_applies_pack_size_decisions_and_records_them(tmp_path):
    from rollout_plugin.config.schema import PackControlConfig
    from rollout_plugin.pool.telemetry import EngineMetrics

    now = [0.0]
    engine = FakeEngine("a")
    engine.gate = asyncio.Event()  # work stays queued: every window is throughput-bound
    timeline = tmp_path / "t.jsonl"
    ctl = ControllerConfig(timeline=str(timeline), pack=PackControlConfig(window_s=5.0))
    async with RolloutPool(pool=PoolConfig(per_engine=8, pack_size=8, over_concurrency_ratio=1.0), controller=ctl,
                           clients=[engine], clock=lambda: now[0]) as pool:
        task = asyncio.ensure_future(pool.generate([Request(f"r{i}", "p") for i in range(100)]))
        async with asyncio.timeout(5):
            while pool.monitor.states is None or not pool.stats().queued:
                await asyncio.sleep(0)
        for t, tokens in ((0.0, 0.0), (5.0, 1000.0)):
            now[0] = t
            pool.monitor.observe([EngineMetrics(generation_tokens_total=tokens)])
        assert pool._dispatcher.pack_size == 4  # pack 8 scored, its neighbour is measured next
        engine.gate.set()
        await task
    packs = [json.loads(line) for line in timeline.read_text().splitlines() if '"pack"' in line]
    assert packs and packs[0]["old"] == 8 and packs[0]["new"] == 4 and "200 tok/s" in packs[0]["reason"]
