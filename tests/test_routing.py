"""Routing policy (pure): the least-filled engine, and when a GRPO group is split across engines."""

from __future__ import annotations

from rollout_plugin.pool.routing import EngineLoad, pick_engine, split_group


def loads(*pairs, unhealthy=()) -> list[EngineLoad]:
    return [EngineLoad(i, inflight, cap, i not in unhealthy) for i, (inflight, cap) in enumerate(pairs)]


def test_pick_prefers_the_least_filled_engine_with_room():
    assert pick_engine(loads((8, 16), (2, 16)), 4) == 1
    assert pick_engine(loads((8, 16), (14, 16)), 4) == 0  # the emptier one lacks room
    assert pick_engine(loads((0, 16), (0, 16)), 4, avoid=frozenset({0})) == 1
    assert pick_engine(loads((16, 16), (16, 16)), 1) is None


def test_a_group_stays_whole_while_engines_are_evenly_busy():
    assert split_group(loads((10, 32), (12, 32)), 8, frozenset(), 0.25) == [(0, 8)]
    # saturated and even: nobody fits the group whole, the gap is small, so it waits for one engine
    assert split_group(loads((28, 32), (27, 32)), 8, frozenset(), 0.25) == []


def test_a_group_splits_when_its_engine_is_filled_far_above_another():
    # engine 1 is nearly empty but its (KV-starved) cap of 6 can never hold a group of 8
    assert split_group(loads((20, 32), (0, 6)), 8, frozenset(), 0.25) == [(1, 6), (0, 2)]
    # the same gap with a threshold that tolerates it keeps the group whole
    assert split_group(loads((20, 32), (0, 6)), 8, frozenset(), 0.9) == [(0, 8)]


def test_a_split_waits_when_all_room_together_is_too_small():
    assert split_group(loads((31, 32), (0, 6)), 8, frozenset(), 0.25) == []


def test_dead_engines_get_no_piece():
    assert split_group(loads((20, 32), (0, 32), unhealthy={1}), 8, frozenset(), 0.25) == [(0, 8)]
