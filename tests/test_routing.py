"""Routing policy (pure): the least-filled engine, and when a GRPO group is split across engines."""

from __future__ import annotations

from rollout_plugin.pool.policy.routing import EngineLoad, pick_engine, split_group


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


def test_affinity_keeps_a_key_on_its_home_until_the_imbalance_gate_opens():
    from rollout_plugin.pool.policy.routing import pick_near

    near = lambda ls, home, own, threshold=0.25: pick_near(ls, 1, frozenset(), home, own, threshold)  # noqa: E731
    assert near(loads((8, 8), (8, 8)), None, 0) is None  # every engine at its cap: wait
    assert near(loads((3, 8), (2, 8)), None, 0) == 1  # no home yet: least loaded
    # The home, filled 2/8 by others (the key's own 3 not counted), vs 4/8: stay.
    assert near(loads((5, 8), (4, 8)), 0, 3) == 0
    # Others fill the home 5/8 while engine 1 is empty: the gate (0.25 of the cap) opens.
    assert near(loads((6, 8), (0, 8)), 0, 1) == 1
    assert near(loads((6, 8), (0, 8)), 0, 1, threshold=1.0) == 0
    # Home full, engines evenly busy: wait for the home rather than lose the prefix.
    assert near(loads((8, 8), (7, 8)), 0, 4) is None
    assert near(loads((8, 8), (1, 8)), 0, 4) == 1
    # A dead home: go where the room is.
    assert near(loads((0, 8), (5, 8), unhealthy={0}), 0, 0) == 1


def test_a_request_with_several_keys_follows_the_first_key_that_has_a_home():
    from rollout_plugin.pool.core.affinity import Affinity

    a = Affinity()
    a.placed(("group:1", "session:x"), 1, 1)  # first turn: the group had no home; both keys now live on 1
    assert a.home(("session:x", "group:1")) == (1, 1) and a.home("group:1") == (1, 1)
    a.placed(("session:y", "group:1"), 0, 1)  # another sample of the group, sent away: a move
    assert a.moved == 1 and a.home("group:1") == (1, 1) and a.home("session:y") == (0, 1)
    a.left(("group:1", "session:x"), 1, 1)
    assert a.home("session:x") == (1, 0)
    a.forget(1)
    assert a.home("group:1") == (None, 0)


def test_a_slow_engine_looks_fuller_by_its_speed_so_it_gets_a_share_in_proportion():
    fast, slow = EngineLoad(0, 20, 100), EngineLoad(1, 10, 100, speed=1 / 3)
    assert pick_engine([fast, slow], 4) == 0  # 10 in flight at a third of the speed weighs as 30
    assert pick_engine([fast, EngineLoad(1, 5, 100, speed=1 / 3)], 4) == 1  # below its share: it gets work
    assert pick_engine([EngineLoad(0, 20, 100), EngineLoad(1, 10, 100)], 4) == 1  # unweighed: the emptier one


def test_a_request_cut_off_its_home_does_not_go_back_there():
    """A straggler move (or a death) puts the engine in the unit's ``avoid``: affinity must not send the continued
    sample straight home again. It did, and with sessions keyed by affinity the monitor moved the same calls off
    a slow home and back every interval: a 64-engine simulated run never finished."""
    from rollout_plugin.pool.policy.routing import pick_near

    ls = loads((2, 100), (1, 100), (3, 100))
    assert pick_near(ls, 1, frozenset(), home=0, home_own=2, threshold=0.25) == 0  # home, as before
    assert pick_near(ls, 1, frozenset({0}), home=0, home_own=2, threshold=0.25) == 1  # avoided: least loaded
    only_home = loads((2, 100), (100, 100))
    assert pick_near(only_home, 1, frozenset({0}), home=0, home_own=2, threshold=0.25) == 0  # nothing else fits


def test_affinity_yields_when_its_home_runs_far_more_than_the_fleet_mean_though_caps_are_far_away():
    """Bounded-load affinity: on the real CPU pair (caps 1,229, KV to spare) whole groups of sessions piled onto
    one engine, 24 sessions vs 8, because the cap-share gate (0.25 × 1,229) never opened; every turn there then
    decoded in the bigger batch (benchmarks/sessions.py: the pool 1.22× the static split)."""
    from rollout_plugin.pool.policy.routing import pick_near

    near = lambda ls, home, own: pick_near(ls, 1, frozenset(), home, own, 0.25)  # noqa: E731
    assert near(loads((24, 1229), (8, 1229)), 0, 0) == 1  # 25 > 1.25 × 16.5: the turn goes to the emptier engine
    assert near(loads((17, 1229), (16, 1229)), 0, 0) == 0  # evenly busy: the prefix wins
    assert near(loads((24, 1229), (8, 1229)), 0, 8) == 0  # the key's own 8 there are not others' load
    assert near(loads((2, 1229), (1, 1229)), 0, 0) == 0  # a difference of one request moves nothing
    assert near(loads((24, 1229), (8, 1229), (0, 1229, ), unhealthy={2}), 0, 0) == 1  # the mean of live engines
