"""Spreading a step's tail (pool/policy/spread.py): the planner, the pool's moves on simulated engines, and the
simulated engine's abort within a step (the real engine's answer to an abort: test_tail_spread_engine.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import pytest

from rollout_plugin.pool.observe.telemetry import EngineMetrics, step_point
from rollout_plugin.pool.policy.spread import StepFit, TailShare, batch_bound, fit_step, plan_spread
from rollout_plugin.sim.client import SimEngineClient
from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.engine import SimEngine
from rollout_plugin.sim.profile import EngineProfile, StepModel, load_profile
from rollout_plugin.sim.runner import run_virtual, simulate


def share(index: int, running: int, inflight: int | None = None, movable: int = 4, calls: int | None = None,
          **kw) -> TailShare:
    """An engine whose calls hold one running sequence each unless said."""
    return TailShare(index, running, running if inflight is None else inflight, movable,
                     running if calls is None else calls, **kw)


def test_each_idle_engine_takes_a_sequence_off_the_most_crowded_engine_at_that_point():
    engines = [share(0, 6), share(1, 3), share(2, 0), share(3, 0), share(4, 0)]
    assert plan_spread(engines, backlog=0) == {0: 3}  # 6 -> 5 -> 4: still above engine 1's 3 each time
    engines = [share(0, 6), share(1, 5), share(2, 0), share(3, 0), share(4, 0)]
    assert plan_spread(engines, backlog=0) == {0: 2, 1: 1}


def test_past_one_each_a_sequence_moves_only_to_an_engine_left_less_crowded_than_its_own():
    # Batch-bound engines (CPU): 6 and 3 over three idle engines go one each (6 -> 3), then engine 0's fourth
    # and engine 1's first land as seconds (2 <= what each leaves behind); then every engine holds 2.
    engines = [share(0, 6, batch_bound=True), share(1, 3, batch_bound=True), share(2, 0), share(3, 0), share(4, 0)]
    assert plan_spread(engines, backlog=0) == {0: 4, 1: 1}


def test_a_batch_bound_pair_splits_its_tail_evenly_and_a_flat_one_keeps_it():
    # The CPU pair's tail: 80 sequences in 10 calls on engine 0, engine 1 idle: engine 1 takes calls while it
    # stays no busier than engine 0 (40 and 40). Where a step costs the same with fewer sequences (an H100 near
    # the tail) one idle engine cannot take a call's 8 "one each", and nothing moves.
    assert plan_spread([share(0, 80, movable=10, calls=10, batch_bound=True), share(1, 0)], backlog=0) == {0: 5}
    assert plan_spread([share(0, 80, movable=10, calls=10), share(1, 0)], backlog=0) == {}
    # A KV-starved idle engine takes only what its cap holds: two calls of 8 into a cap of 20, not five.
    starved = share(1, 0, cap=20)
    assert plan_spread([share(0, 80, movable=10, calls=10, batch_bound=True), starved], backlog=0) == {0: 2}


def test_a_batch_counts_as_batch_bound_only_where_measured_so():
    cpu, gpu = StepFit(), StepFit()
    for batch in (256, 200, 32):
        cpu = fit_step(cpu, batch, step_s=batch / 4000)  # CPU engine: tokens/s flat, a step all per-sequence work
        gpu = fit_step(gpu, batch, step_s=0.0062 + 0.0001 * batch)  # H100-like: 6.2 ms fixed
    assert batch_bound(cpu, 8) and batch_bound(cpu, 200)
    assert not batch_bound(gpu, 30) and batch_bound(gpu, 100)  # 3 ms of 9 per step vs 10 of 16
    assert not batch_bound(StepFit(), 100)  # nothing measured
    assert not batch_bound(fit_step(StepFit(), 80, 0.02), 80)  # one batch size: no fit
    assert not batch_bound(fit_step(fit_step(StepFit(), 100, 0.025), 60, 0.016), 80)  # too close to fit
    assert fit_step(cpu, 0, 0.01) == cpu and fit_step(cpu, 50, 0.0) == cpu  # no decoding, no measurement


def test_a_windows_batch_and_step_time_come_from_vllms_histograms_however_long_the_engine_idled():
    before = EngineMetrics(step_tokens_sum=1000.0, steps_total=100.0, itl_sum=2.0, itl_count=900.0)
    after = EngineMetrics(step_tokens_sum=1000.0 + 40 * 50, steps_total=150.0, itl_sum=2.0 + 0.01 * 2000,
                          itl_count=2900.0)
    assert step_point(before, after) == pytest.approx((40.0, 0.01))
    assert step_point(before, replace(after, steps_total=104.0)) is None  # too few steps to count
    assert step_point(EngineMetrics(), after) is None  # a server without the histograms: no measurement


def test_a_call_moves_only_while_idle_engines_remain_for_the_sequences_it_is_reckoned_to_hold():
    # Engine 0's one call holds its 8 sequences: three idle engines cannot take them, so it stays; engine 1's
    # calls hold two each: one moves (two idle engines), then one idle engine is too few for the next.
    engines = [share(0, 8, calls=1), share(1, 4, calls=2), share(2, 0), share(3, 0), share(4, 0)]
    assert plan_spread(engines, backlog=0) == {1: 1}


def test_nothing_moves_while_work_waits_nothing_is_idle_or_nothing_is_crowded():
    crowded_and_idle = [share(0, 8), share(1, 0)]
    assert plan_spread(crowded_and_idle, backlog=1) == {}  # routing fills the idle engine with queued work
    assert plan_spread([share(0, 8), share(1, 2)], backlog=0) == {}  # no idle engine
    assert plan_spread([share(0, 1), share(1, 0)], backlog=0) == {}  # a sample alone gains nothing by moving


def test_unhealthy_slow_or_unmovable_engines_neither_give_nor_take():
    assert plan_spread([share(0, 8), share(1, 0, slow=True), share(2, 0, healthy=False)], backlog=0) == {}
    assert plan_spread([share(0, 8, movable=0), share(1, 0)], backlog=0) == {}
    # An engine the pool has nothing on is idle even if its /metrics still shows sequences (another pool's).
    assert plan_spread([share(0, 8, movable=1), share(1, 3, inflight=0, movable=0), share(2, 0)],
                       backlog=0) == {0: 1}


PROFILE = load_profile("h100_llama8b")


def _long_tail(spread: bool, seed: int) -> SimulateConfig:
    """The issue's long-tail step (σ 1.2, up to 16,384 tokens) on a 16-engine fleet."""
    cfg = SimulateConfig()
    cfg.workload.output_tokens_sigma, cfg.workload.max_tokens, cfg.workload.seed = 1.2, 16384, seed
    cfg.fleet.max_model_len = 18432
    cfg.controller.tail_spread = spread
    return cfg


def test_spreading_shortens_a_long_tail_step_and_moves_each_call_once(monkeypatch):
    carried: dict[str, list[str]] = {}
    aborted: list[str] = []
    generate, abort_call = SimEngineClient.generate, SimEngineClient.abort_call

    async def recording_generate(self, requests, progress=None, *, call_id=None):
        if call_id is not None:
            carried[call_id] = [r.id for r in requests]
        return await generate(self, requests, progress, call_id=call_id)

    async def recording_abort(self, call_id, requests):
        aborted.append(call_id)
        await abort_call(self, call_id, requests)

    monkeypatch.setattr(SimEngineClient, "generate", recording_generate)
    monkeypatch.setattr(SimEngineClient, "abort_call", recording_abort)
    on = simulate(Policy.pool, 16, PROFILE, _long_tail(True, 1))
    moved = Counter(rid for call in aborted for rid in carried[call])
    assert moved and max(moved.values()) == 1  # moved work is never moved again
    monkeypatch.undo()
    off = simulate(Policy.pool, 16, PROFILE, _long_tail(False, 1))
    # Whole outputs either way (simulate checks the tokens); the spread step ends sooner (132.3 s vs 135.9 s).
    assert on.failed == off.failed == 0 and on.output_tokens == off.output_tokens
    assert on.makespan_s < 0.98 * off.makespan_s


@pytest.mark.parametrize("seed", [0, 2])
def test_spreading_never_lengthens_a_long_tail_step(seed):
    on, off = (simulate(Policy.pool, 16, PROFILE, _long_tail(spread, seed)) for spread in (True, False))
    assert on.makespan_s <= off.makespan_s * 1.001


def test_a_simulated_abort_in_a_segments_first_step_leaves_the_engines_clock_right():
    """An abort before a segment's first step ends used to leave that segment's pieces behind: the engine's
    remaining sequences then decoded far too slowly (a 16-engine long-tail step took 1,756 s, not 121 s)."""
    step = StepModel(base_s=0.01, per_seq_s=0.001, per_ctx_token_s=0.0, per_prefill_token_s=0.0)
    profile = EngineProfile("t", step, kv_tokens=100_000, max_num_seqs=64, max_num_batched_tokens=8192)

    async def run(abort: bool) -> float:
        engine = SimEngine("e", profile)
        loop = asyncio.get_running_loop()
        # Samples that end inside the segment without ending their call: the segment has pieces (0, 20, 50).
        keep = engine.submit([8], [[50, 100]])
        other = engine.submit([8], [[20, 100]])
        if abort:
            # Virtual time: ``other`` joined at the end of the first step (0.012 s: two sequences) and a segment of
            # four began there; 0.001 s into it, no step of it is done.
            await asyncio.sleep(0.013)
            engine.abort(other, answer=True)
        await keep.future
        return loop.time()

    alone_after_abort, both = run_virtual(run(True)), run_virtual(run(False))
    # The first step and the partial one (0.013 s), then 49 steps with two sequences and 50 with one.
    assert alone_after_abort == pytest.approx(0.013 + 49 * 0.012 + 50 * 0.011, rel=0.02)
    assert alone_after_abort < both


def test_the_simulated_engine_reports_vllms_step_histograms_so_the_fit_sees_its_step_model():
    """The simulator's /metrics carries what the tail spread measures on a real engine (iteration tokens and
    inter-token latency): a batch of 8 on a 10 ms + 1 ms/sequence step model reads as 8 sequences at 18 ms."""
    step = StepModel(base_s=0.01, per_seq_s=0.001, per_ctx_token_s=0.0, per_prefill_token_s=0.0)
    profile = EngineProfile("t", step, kv_tokens=100_000, max_num_seqs=64, max_num_batched_tokens=8192)

    async def run():
        engine = SimEngine("e", profile)
        call = engine.submit([8], [[200] * 8])
        await asyncio.sleep(0.5)
        before = engine.metrics()
        await asyncio.sleep(1.0)  # mid-segment: the partial segment's steps count too
        after = engine.metrics()
        await call.future
        return step_point(before, after), step_point(before, engine.metrics())

    mid, whole = run_virtual(run())
    assert mid == pytest.approx((8.0, 0.018), rel=0.01) and whole == pytest.approx((8.0, 0.018), rel=0.01)
