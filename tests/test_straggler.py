"""Straggler-aware placement: speed verdicts and moves (pure), and what they buy under the real pool (simulator)."""

from __future__ import annotations

from rollout_plugin.pool.policy.straggler import EngineRate, EngineShare, judge_speeds, plan_moves
from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.profile import EngineProfile, StepModel
from rollout_plugin.sim.runner import simulate
from rollout_plugin.sim.workload import build_sessions, total_output_tokens

STEP = StepModel(base_s=0.01, per_seq_s=0.001, per_ctx_token_s=0.0, per_prefill_token_s=0.0)
PROFILE = EngineProfile("test", STEP, kv_tokens=100_000, max_num_seqs=64, max_num_batched_tokens=8192)


def rates(*pairs) -> list[EngineRate]:
    return [EngineRate(i, tps, running) for i, (tps, running) in enumerate(pairs)]


# -- speed verdicts ---------------------------------------------------------------------------------
def test_an_engine_three_times_slower_at_the_same_batch_is_judged_slow():
    speeds = [1.0] * 5
    for _ in range(3):
        speeds = judge_speeds(speeds, rates((3000, 100), (3000, 100), (3000, 100), (3000, 100), (1000, 100)))
    assert speeds[:4] == [1.0] * 4
    assert 0.3 < speeds[4] < 0.45


def test_a_busier_engine_is_not_slow_for_its_longer_steps_and_a_lighter_one_is_not_compared_upward():
    # engine 0 runs twice the batch: its per-sequence rate is lower, but no engine runs as many to compare with
    speeds = judge_speeds([1.0] * 4, rates((4000, 200), (3000, 100), (3000, 100), (3000, 100)))
    assert speeds == [1.0] * 4


def test_an_engine_slower_for_its_longer_contexts_is_not_a_straggler():
    # engine 4 decodes each sequence at half the others' rate, but holds twice their KV: its steps are longer
    # for the work it does, and moving that work would only start it over elsewhere
    longer = [EngineRate(i, 3000, 100, kv_usage=0.3) for i in range(4)] + [EngineRate(4, 1500, 100, kv_usage=0.6)]
    assert judge_speeds([1.0] * 5, longer) == [1.0] * 5
    same = longer[:4] + [EngineRate(4, 1500, 100, kv_usage=0.3)]
    assert judge_speeds([1.0] * 5, same)[4] < 0.8


def test_a_verdict_holds_while_nothing_comparable_is_measured():
    speeds = judge_speeds([1.0, 1.0, 1.0, 0.3], rates((None, None), (3000, 100), (3000, 100), (0, 0)))
    assert speeds[3] == 0.3  # emptied by a move: it keeps its verdict
    # a straggler left with 30 running next to engines running 64: their longer steps would flatter it
    light = rates((900, 64), (900, 64), (900, 64), (900, 64), (250, 30))
    assert judge_speeds([1.0, 1.0, 1.0, 1.0, 0.35], light)[4] == 0.35


def test_too_few_peers_or_running_sequences_give_no_verdict():
    assert judge_speeds([1.0] * 3, rates((3000, 100), (3000, 100), (1000, 100))) == [1.0] * 3  # 2 peers
    assert judge_speeds([1.0] * 5, rates(*[(30, 3)] * 4, (10, 3))) == [1.0] * 5  # 3 running: mostly fixed cost


# -- moves ------------------------------------------------------------------------------------------
def shares(*rows) -> list[EngineShare]:
    return [EngineShare(i, speed, inflight, cap) for i, (speed, inflight, cap) in enumerate(rows)]


def test_nothing_moves_while_work_waits_in_the_pool_or_on_a_healthy_fleet():
    assert plan_moves(shares((1.0, 50, 100), (0.3, 80, 100)), backlog=8) == {}
    assert plan_moves(shares((1.0, 50, 100), (0.9, 80, 100), (0.8, 100, 100)), backlog=0) == {}


def test_at_a_steps_end_the_slow_engines_work_moves_as_far_as_the_others_have_room():
    assert plan_moves(shares((1.0, 50, 100), (1.0, 60, 100), (0.3, 80, 100)), backlog=0) == {2: 80}
    # room for 30 only: the slowest first
    assert plan_moves(shares((1.0, 85, 100), (1.0, 85, 100), (0.5, 40, 100), (0.3, 20, 100)), backlog=0) == {3: 20,
                                                                                                          2: 10}


# -- under the real pool, in the simulator ----------------------------------------------------------
def _cfg(moves: bool, stragglers: float) -> SimulateConfig:
    cfg = SimulateConfig()
    for k, v in {"prompts_per_engine": None, "prompts": 256, "k": 4, "output_tokens_median": 60,
                 "prompt_tokens_median": 32, "max_tokens": 256}.items():
        setattr(cfg.workload, k, v)
    cfg.fleet.straggler_fraction = stragglers
    cfg.fleet.straggler_slowdown = 3.0
    cfg.controller.straggler_moves = moves
    cfg.controller.tail_spread = moves  # the other way work leaves a crowded engine (pool/policy/spread.py)
    return cfg


def test_the_pool_moves_work_off_stragglers_at_a_steps_end():
    """All work fits at once (the queue is empty from the start, as in a GRPO step on big caps), so the
    least-filled rule alone gives a straggler the same share as everyone: without moves the pool waits for it."""
    runs = {}
    for moves in (True, False):
        cfg = _cfg(moves, 0.25)
        sessions = build_sessions(cfg.workload, 256)
        runs[moves] = simulate(Policy.pool, 8, PROFILE, cfg, sessions)
        assert runs[moves].failed == 0 and runs[moves].output_tokens == total_output_tokens(sessions)
    static = simulate(Policy.static, 8, PROFILE, cfg, sessions)
    assert runs[True].makespan_s < 0.75 * runs[False].makespan_s
    assert runs[True].makespan_s < 0.6 * static.makespan_s


def test_moves_cost_a_healthy_fleet_nothing():
    on, off = (simulate(Policy.pool, 8, PROFILE, _cfg(moves, 0.0)) for moves in (True, False))
    # Nothing is slow, so nothing leaves for that; a step's tail spreads to idle engines (15.1 s vs 15.7 s).
    assert on.makespan_s <= off.makespan_s and on.output_tokens == off.output_tokens
