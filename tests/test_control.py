"""The adaptive controller (pure, fake clock) and the monitor loop against in-memory engines."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from fakes import FakeEngine
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.pool.policy.caps import Observation, initial_state, kv_estimate_cap, step
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics
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


class ToyEngine:
    """One observation a second of an engine whose tokens/s is a function of the cap: a fake clock and a
    fake engine for the controller alone. Work always waits in the pool; the cap binds at once."""

    def __init__(self, rate, preempts_above=None, slots=10**9):
        self.rate, self.preempts_above, self.slots = rate, preempts_above, slots
        self.t, self.tokens, self.preemptions = 0.0, 0.0, 0.0

    def drive(self, state, seconds, cfg=CFG):
        decisions = []
        for _ in range(seconds):
            state, d = step(state, self.observe(state.cap), cfg)
            decisions.append(d)
            self.t += 1.0
            self.tokens += self.rate(state.cap)
            if self.preempts_above is not None and state.cap > self.preempts_above:
                self.preemptions += 1
        return state, decisions

    def observe(self, cap):
        return Observation(t=self.t, inflight=cap, backlog=10_000, tokens_total=self.tokens,
                           running=min(cap, self.slots), waiting=max(0, cap - self.slots),
                           preemptions_total=self.preemptions)


# -- raising: slow start, plateau, undo, re-probe -----------------------------------------------------
def test_slow_start_doubles_while_raises_pay_then_settles_where_they_stop():
    state = initial_state(25, ControllerConfig(max_cap=1000), group_size=1)
    engine = ToyEngine(lambda cap: 10.0 * min(cap, 150))  # tokens/s grow with the batch up to 150 sequences
    state, d = engine.drive(state, 30, ControllerConfig(max_cap=1000))
    raises = [(x.old, x.cap) for x in d if x.changed]
    # Doubled while each raise paid (judged on a record of trial_s each); 400 bought nothing over 200 but
    # cost nothing either: it stays (never worse than sending more), and raising stops.
    assert raises == [(25, 50), (50, 100), (100, 200), (200, 400)]
    assert state.cap == 400 and state.plateau and not state.slow_start
    assert "1000 tok/s at 100 (up from 500 with the last raise)" in [x.reason for x in d if x.changed][2]


def test_a_raise_that_costs_throughput_is_undone():
    state = initial_state(100, CFG, group_size=1)
    engine = ToyEngine(lambda cap: 1000.0 if cap <= 100 else 700.0)
    state, d = engine.drive(state, 10)
    moves = [(x.old, x.cap) for x in d if x.changed]
    assert moves == [(100, 200), (200, 100)] and state.cap == 100 and state.plateau
    assert [x.reason for x in d if x.changed][1] == "the raise to 200 cost tokens/s (1000 -> 700): back to 100"


def test_a_plateau_is_probed_again_after_reprobe_s():
    cfg = ControllerConfig(reprobe_s=20.0)
    state = initial_state(100, cfg, group_size=1)
    more = [1010.0]  # what a cap above 200 buys: 1 % more than 200 does, so raising stops at 400
    engine = ToyEngine(lambda cap: 1000.0 if cap <= 200 else more[0])
    state = replace(state, cap=200, ceiling=1000)
    state, d = engine.drive(state, 10, cfg)
    assert state.cap == 400 and state.plateau
    more[0] = 3000.0  # the workload changed: more would pay now
    state, d = engine.drive(state, 25, cfg)
    assert state.cap >= 500 and any(x.changed and (x.old, x.cap) == (400, 500) and "probing" in x.reason for x in d)


def test_never_raises_when_the_engine_queues_or_the_pool_is_empty():
    state = replace(initial_state(100, CFG, group_size=1), slow_start=False)
    _, d = run(state, [busy(0, 0), busy(1, 1000, waiting=5)])
    assert [x.cap for x in d] == [100, 100]
    _, d = run(replace(state, slow_start=True), [busy(0, 0), busy(1, 1000, waiting=5)])
    assert [x.cap for x in d] == [100, 200]  # (slow start measures instead: the first cap is only an estimate)
    _, d = run(state, [busy(0, 0), busy(1, 1000, backlog=0)])
    assert [x.cap for x in d] == [100, 100]
    _, d = run(state, [busy(0, 0), busy(1, 1000, inflight=10)])  # not cap-bound
    assert [x.cap for x in d] == [100, 100]


def test_a_records_window_starts_when_the_cap_binds_not_during_the_ramp_before():
    # The first look sees nothing in flight; the next sees the cap full but no token yet (prefill). A window
    # from the first look would record 0 tok/s at this cap, and later compare every other cap against it.
    state = initial_state(50, CFG, group_size=1)
    state, _ = run(state, [busy(0, 0, inflight=0), busy(1, 0, inflight=50), busy(2, 1000, inflight=50)])
    assert state.records == ((50, 1000.0),)


# -- cuts on trial: undone where preemption is cheap, kept where it costs ----------------------------
def trial_cut(after_rate, cfg=CFG):
    """Cap 100 at 1000 tok/s meets preemptions at t=2 (cut on trial to 70, binds at once); then after_rate."""
    state = replace(initial_state(100, cfg, group_size=1), slow_start=False)
    # (The engine's own queue is not empty, so there is no probing raise on the way.)
    obs = [busy(0, 0, preemptions_total=0, waiting=2), busy(1, 1000, preemptions_total=0, waiting=2),
           busy(2, 2000, preemptions_total=5, waiting=2)]
    state, d = run(state, obs, cfg)
    assert (d[2].old, d[2].cap) == (100, 70) and d[2].reason.startswith("preemptions +5: cut on trial (1000 tok/s")
    tokens = 2000.0
    for t in range(3, 7):
        tokens += after_rate
        state, dec = step(state, busy(t, tokens, inflight=70, preemptions_total=5), cfg)
        d.append(dec)
    return state, d, tokens


def test_a_cut_that_costs_throughput_is_undone_and_preemption_then_counts_as_cheap():
    state, d, tokens = trial_cut(after_rate=600.0)
    assert [x.cap for x in d[3:]] == [70, 70, 70, 100]  # judged trial_s (3 s) after the cut bit (t=3)
    assert d[-1].reason.startswith("the cut to 70 cost tokens/s (1000 -> 600): back to 100; preemption is cheap here")
    # Preemptions and KV pressure alone no longer cut; and raises may go on while the engine queues.
    state, later = run(state, [busy(7, tokens + 1000, preemptions_total=50, kv_usage=0.99, waiting=20)])
    assert later[0].cap == 125 and "20 queued in the engine" in later[0].reason


def test_a_cut_that_holds_throughput_stands_and_protection_continues():
    state, d, tokens = trial_cut(after_rate=1000.0)
    assert all(x.cap == 70 for x in d[3:]) and "the cut to 70 stands (1000 -> 1000 tok/s)" == d[-1].reason
    state, d = run(state, [busy(7, tokens + 1000, inflight=70, preemptions_total=9)])
    assert d[0].cap == 49 and d[0].reason.startswith("preemptions +4: cut on trial")


def test_cheap_verdicts_expire_and_each_new_one_holds_twice_as_long():
    cfg = ControllerConfig(cheap_s=10.0)
    engine = ToyEngine(lambda cap: 10.0 * cap, preempts_above=50)  # preemptions, but every cut costs tokens/s
    state = initial_state(100, cfg, group_size=1)
    state, d = engine.drive(state, 90, cfg)
    verdicts = [(t, x.reason) for t, x in enumerate(d) if x.reason and "cheap here" in x.reason]
    assert [r.split("for ")[-1] for _, r in verdicts][:3] == ["10 s", "20 s", "40 s"]
    gaps = [b[0] - a[0] for a, b in zip(verdicts, verdicts[1:])]
    assert gaps[0] >= 10 and gaps[1] >= 20  # each new trial came only once the last verdict had expired


def test_pressure_at_a_cap_that_beat_a_lower_one_is_not_cut():
    # Past slow start, with a record of cap 100 (1000 tok/s) from earlier: cap 200 buys 1800, preemptions and all.
    state = replace(initial_state(200, CFG, group_size=1), slow_start=False, records=((100, 1000.0),))
    state, d = run(state, [busy(0, 0, inflight=200, preemptions_total=0, waiting=1),
                           busy(1, 1800, inflight=200, preemptions_total=0, waiting=1),
                           busy(2, 3600, inflight=200, preemptions_total=4, waiting=1)])
    assert not any(x.changed for x in d) and state.trial is None and state.cheap_until == 2 + 300
    assert d[2].reason == ("preemptions +4, but 200 buys 1800 tok/s vs 1000 at 100: preemption is cheap here, "
                           "no cut on it alone for 300 s")


def test_slow_start_probes_through_pressure_until_a_raise_does_not_pay():
    # The first cap is only an estimate (KV-based): pressure there does not stop slow start. Here tokens/s grow
    # up to 100 sequences and then fall (recompute wastes real work): the cut comes once raising stops paying.
    engine = ToyEngine(lambda cap: 10.0 * cap if cap <= 100 else max(100.0, 1000.0 - 4.0 * (cap - 100)),
                       preempts_above=30)
    state, d = engine.drive(initial_state(25, ControllerConfig(max_cap=1000), group_size=1), 40,
                            ControllerConfig(max_cap=1000))
    changed = [x for x in d if x.changed]
    assert [(x.old, x.cap) for x in changed][:4] == [(25, 50), (50, 100), (100, 200), (200, 100)]
    assert "; preemptions +" in changed[1].reason and changed[3].reason.startswith("the raise to 200 cost tokens/s")
    assert state.cap <= 100


def test_no_cut_while_nothing_waits_in_the_pool_and_a_trial_waits_for_the_cut_to_bite():
    state = initial_state(100, CFG, group_size=1)
    _, d = run(state, [busy(0, 0, backlog=0, preemptions_total=0), busy(1, 900, backlog=0, preemptions_total=9)])
    assert not d[1].changed  # everything is dispatched: a cut would act on nothing and could not be judged
    state = replace(state, slow_start=False)
    state, d = run(state, [busy(0, 0, preemptions_total=0, waiting=1), busy(1, 1000, preemptions_total=0, waiting=1),
                           busy(2, 2000, preemptions_total=3)])
    assert d[2].cap == 70
    tokens = 2000.0
    for t in range(3, 10):  # in flight stays above the new cap (long samples draining): no verdict yet
        tokens += 400
        state, dec = step(state, busy(t, tokens, inflight=90, preemptions_total=3), CFG)
        assert not dec.changed and state.trial is not None and state.trial.t is None
    state, dec = step(state, busy(10, tokens, inflight=60, backlog=0), CFG)
    assert state.trial is None and state.cap == 70  # the pool ran dry before a verdict: the cut stands


def test_no_cut_when_what_is_left_fits_in_the_cap():
    # The end of a step: 50 samples left, cap 100. A cut would hold them back and stretch the tail.
    state = replace(initial_state(100, CFG, group_size=1), slow_start=False)
    state, d = run(state, [busy(0, 0, backlog=50, waiting=1, preemptions_total=0),
                           busy(1, 1000, backlog=50, waiting=1, preemptions_total=0),
                           busy(2, 2000, backlog=50, waiting=1, preemptions_total=7)])
    assert not any(x.changed for x in d) and state.trial is None


def test_in_the_costly_world_the_cap_settles_below_where_preemption_starts():
    # Past 60 sequences the engine preempts and each one more costs tokens/s (recompute wastes real work).
    engine = ToyEngine(lambda cap: 10.0 * cap if cap <= 60 else max(100.0, 600.0 - 5.0 * (cap - 60)),
                       preempts_above=60, slots=60)
    state = initial_state(200, CFG, group_size=1)
    state, d = engine.drive(state, 120)
    assert 40 <= state.cap <= 70, [(x.old, x.cap, x.reason) for x in d if x.changed]


def test_in_the_cheap_world_the_cap_stays_high():
    # Preemptions past 60 sequences, but tokens/s keep growing with the batch (recompute is cheap here).
    engine = ToyEngine(lambda cap: 10.0 * min(cap, 400), preempts_above=60, slots=300)
    state = initial_state(200, CFG, group_size=1)
    state, d = engine.drive(state, 120)
    assert state.cap >= 200, [(x.old, x.cap, x.reason) for x in d if x.changed]


def test_cuts_stop_at_the_floor_of_one_group():
    state = initial_state(100, CFG, group_size=8)
    engine = ToyEngine(lambda cap: 900.0, preempts_above=0)  # pressure at any cap, cutting costs nothing
    state, d = engine.drive(state, 80)
    assert state.cap == 8 and all(x.cap >= 8 for x in d)


# -- need: the floor follows the largest waiting request ---------------------------------------------
def test_a_waiting_request_larger_than_the_cap_lifts_it_even_with_nothing_in_flight():
    state = replace(initial_state(16, CFG, group_size=1), cap=4)  # cut to 4 under KV pressure earlier
    state, d = run(state, [busy(0, 0, inflight=0, backlog=9, need=8)])
    assert d[0].cap == 8 and d[0].reason == "a waiting request needs 8 samples"
    state, d = run(state, [busy(1, 100, inflight=8, backlog=9, need=8, preemptions_total=0),
                           busy(2, 200, inflight=8, backlog=9, need=8, preemptions_total=5)])
    assert all(x.cap >= 8 for x in d)  # a cut never goes below it either
    off = ControllerConfig(mode=ControllerMode.off)
    _, d = run(replace(initial_state(4, off, group_size=1)), [busy(0, 0, inflight=0, need=8)], off)
    assert d[0].cap == 8  # fixed caps too: otherwise the request waits forever
    _, d = run(initial_state(4, ControllerConfig(max_cap=4), group_size=1), [busy(0, 0, inflight=0, need=6)])
    assert d[0].cap == 6  # even above the ceiling


def test_observations_without_need_still_work():
    # The verl router builds Observation without need (it passes none yet): the default changes nothing.
    state = initial_state(100, CFG, group_size=1)
    _, d = run(state, [Observation(t=0, inflight=0, backlog=5, tokens_total=0)])
    assert not d[0].changed


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


def test_kv_estimate_lowers_the_preset_and_raises_it_only_up_to_a_known_batch_limit():
    assert kv_estimate_cap(1024, 1024, 256, 1.2) == (5, "KV holds 1024 tokens = 4 sequences of 256 tokens (×1.2)")
    assert kv_estimate_cap(64, 10**7, 256, 1.2)[0] == 64  # batch limit unknown: the preset
    assert kv_estimate_cap(64, None, 256, 1.2)[0] == 64


def test_the_context_length_preset_is_a_start_not_a_ceiling_when_the_kv_cache_holds_more():
    # The long tail: max_model_len 18,432 gives a preset of 128 (×1.2) while a 400k-token KV cache
    # holds ~370 sequences of the workload's ~1,080 tokens; the engine batches up to 1,024 sequences.
    cap, why = kv_estimate_cap(154, 400_000, 1080, 1.2, upper=1229)
    assert cap == 444 and "370 sequences" in why
    assert kv_estimate_cap(154, 400_000, 100, 1.2, upper=1229)[0] == 1229  # no more than the engine batches


def test_a_late_scrape_is_no_measurement():
    """A /metrics answer that took most of the window (a busy API process) read "22 tok/s at 308" on a CPU
    engine and the controller decided on it: such a look decides nothing, and its counters are not folded in."""
    state = replace(initial_state(100, CFG, group_size=1), slow_start=False)
    state, _ = run(state, [busy(0, 0)])
    late = busy(1, 1000, inflight=100, lag=0.9)
    held, d = step(state, late, CFG)
    assert not d.changed and held == state
    _, d = step(state, replace(late, lag=0.1), CFG)
    assert d.cap == 125  # the same numbers, answered in time: cap-bound with work waiting, a raise


def test_a_window_shorter_than_half_the_interval_is_no_measurement():
    state = replace(initial_state(100, CFG, group_size=1), slow_start=False)
    state, _ = run(state, [busy(0, 0), busy(1, 1000, inflight=100), busy(2, 2000, inflight=100)])
    held, d = step(state, busy(2.1, 2010, inflight=100, kv_usage=0.99), CFG)
    assert not d.changed and held == state
    held, d = step(state, busy(2.1, 2010, inflight=0, need=200), CFG)
    assert d.cap == 200  # the floor still holds: a waiting request must fit


async def test_the_global_cap_follows_raised_engine_caps_unless_the_user_set_it():
    from fakes import FakeEngine

    async with RolloutPool(pool=PoolConfig(per_engine=8, over_concurrency_ratio=1.0),
                           controller=ControllerConfig(mode=ControllerMode.off),
                           clients=[FakeEngine("a"), FakeEngine("b")]) as pool:
        d = pool._dispatcher
        assert d.global_cap == 16
        d.set_cap(0, 40, "raised")
        assert d.global_cap == 48  # a per-engine raise under a fixed global cap only moved work around
    async with RolloutPool(pool=PoolConfig(per_engine=8, over_concurrency_ratio=1.0, max_concurrent=2),
                           controller=ControllerConfig(mode=ControllerMode.off),
                           clients=[FakeEngine("a"), FakeEngine("b")]) as pool:
        pool._dispatcher.set_cap(0, 40, "raised")
        assert pool._dispatcher.global_cap == 2  # the user's max_concurrent (groups of k=1) wins


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


def test_only_the_series_read_are_parsed_and_a_look_alike_name_is_not_summed():
    """The monitor parses ~10 of vLLM's ~600 /metrics lines (10-15 ms -> 0.3 ms a look): what the rest holds,
    even a line the Prometheus parser rejects, changes nothing; a longer name that starts like a read one is
    not read."""
    from rollout_plugin.pool.observe.telemetry import read_lines

    noise = ("# HELP vllm:e2e_request_latency_seconds Histogram.\n# TYPE vllm:e2e_request_latency_seconds histogram\n"
             + "".join(f'vllm:e2e_request_latency_seconds_bucket{{le="{b}",engine="0"}} {b}\n' for b in range(50))
             + 'vllm:num_requests_running_by_lora{engine="0"} 99.0\nvllm:num_requests_waiting_oops {{{\n')
    text = METRICS + noise
    assert len(read_lines(text).splitlines()) == 6
    assert parse_vllm_metrics(text) == parse_vllm_metrics(METRICS)
    assert parse_vllm_metrics(text).running == 7  # not 7 + 99


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
    state = replace(initial_state(100, ControllerConfig(max_cap=1000), group_size=1), slow_start=False)
    cfg = ControllerConfig(max_cap=1000)
    state, d = run(state, [busy(0, 0), busy(1, 1000, inflight=100, kv_usage=0.99)], cfg)
    assert d[1].cap == 70
    tokens, caps = 1000, []
    for t in range(2, 30):  # the cut stands, then tokens/s grow with every raise: the controller wants more
        tokens += 20 * state.cap
        state, dec = step(state, busy(t, tokens, inflight=state.cap), cfg)
        caps.append(dec.cap)
    assert max(caps) == 99 and caps[-1] == 99  # probes back up, never to 100 again


async def test_monitor_applies_pack_size_decisions_and_records_them(tmp_path):
    from rollout_plugin.config.schema import PackControlConfig
    from rollout_plugin.pool.observe.telemetry import EngineMetrics

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
        for t, tokens in ((5.0, 0.0), (10.0, 1000.0)):  # (the pool took its first look at t=0: idle)
            now[0] = t
            pool.monitor.observe([EngineMetrics(generation_tokens_total=tokens)])
        assert pool._dispatcher.pack_size == 4  # pack 8 scored, its neighbour is measured next
        engine.gate.set()
        await task
    packs = [json.loads(line) for line in timeline.read_text().splitlines() if '"pack"' in line]
    assert packs and packs[0]["old"] == 8 and packs[0]["new"] == 4 and "200 tok/s" in packs[0]["reason"]


async def test_first_caps_follow_what_the_requests_need_not_max_model_len():
    """Without controller.expected_tokens the first look can only assume every sequence fills max_model_len
    (2,048: a 1,024-token KV cache holds none, cap 2, while it holds dozens of these requests' 17 tokens);
    the first request's prompt + max_tokens resizes it."""
    from fakes import FakeEngine
    from rollout_plugin.types import SamplingParams

    engine = FakeEngine("a")
    engine.metrics_text = METRICS  # 64 blocks × 16 = 1,024 KV tokens
    async with RolloutPool(pool=PoolConfig(per_engine=64), clients=[engine]) as pool:
        assert pool.stats().engines[0].cap == 2
        engine.gate = asyncio.Event()
        futures = [pool.submit(Request(f"r{i}", "p", sampling=SamplingParams(max_tokens=16))) for i in range(20)]
        await asyncio.sleep(0)
        pool.monitor.observe([parse_vllm_metrics(METRICS)])
        assert pool.stats().engines[0].cap == 72  # 1,024 // 17 = 60 sequences × 1.2 (the preset: 77)
        engine.gate.set()
        assert all(r.ok for r in await asyncio.gather(*futures))


def test_the_monitor_times_each_scrape_and_a_late_one_moves_no_cap():
    """The lag reaches the controller: an engine whose /metrics answers 0.9 s late (virtual time) is not
    observed, while one that answers at once is."""
    from fakes import FakeEngine
    from rollout_plugin.sim.loop import run_virtual

    class Late(FakeEngine):
        async def metrics(self):
            await asyncio.sleep(self.delay)
            return self.metrics_text

    async def main():
        loop = asyncio.get_running_loop()
        engines = [Late("a"), Late("b")]
        for e, delay in zip(engines, (0.0, 0.9)):
            e.metrics_text, e.delay = METRICS, delay
        ctl = ControllerConfig(expected_tokens=256, interval_s=3600)  # the loop looks once; the test drives
        async with RolloutPool(pool=PoolConfig(per_engine=64), controller=ctl, clients=engines,
                               clock=loop.time) as pool:
            await asyncio.sleep(1.0)
            metrics, timing = await pool.monitor._scrape()
            assert [round(lag, 3) for _, lag in timing] == [0.0, 0.9]
            before = list(pool.monitor.states)
            pool.monitor.observe(metrics, timing=timing)
            after = pool.monitor.states
            assert after[0].last_t == timing[0][0] and after[1] == before[1]

    run_virtual(main())
