"""Known-long samples decode in lanes (issue 22, item 3: Seer's lesson under a staleness bound).

A sample whose tokens outlived the staleness bound started over: it is known long. Decoding in a loaded batch it
would miss the bound again, so it goes to a *lane* — an engine that runs known-long samples only, a few at a
time — and other work keeps off that engine until the lane's last long sample ends. The mark lives on the unit
(``Unit.long``); the ledger counts known-long samples per engine beside its in-flight counts.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.ledger import Ledger, Prefix
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.pool.dispatch.admission import Admission
from rollout_plugin.pool.dispatch.resolver import Resolver
from rollout_plugin.pool.dispatch.weight_sync import WeightSync
from rollout_plugin.pool.policy.lanes import LANE_SEQS, lane_to_spare, pick_lane
from rollout_plugin.pool.policy.routing import EngineLoad, pick_engine, pick_near, split_group
from rollout_plugin.types import Request, Result, Sample, Segment


def test_a_lane_takes_no_other_work():
    lane, busy = EngineLoad(0, 1, 256, long=1), EngineLoad(1, 200, 256)
    assert lane.room == 0 and busy.room == 56
    assert pick_engine([lane, busy], 4) == 1  # the lane is nearly empty, yet new work goes around it
    assert split_group([lane, busy], 8, frozenset(), 0.25) == [(1, 8)]
    # An affinity key whose home became a lane goes elsewhere instead of waiting for the lane to end.
    assert pick_near([lane, busy], 1, frozenset(), home=0, home_own=0, threshold=0.25) == 1


def test_known_long_work_fills_a_lane_before_it_opens_another_on_the_emptiest_fast_engine():
    busy = [EngineLoad(i, 100, 256) for i in range(3, 8)]  # eight engines: two may be lanes
    loads = [EngineLoad(0, 100, 256), EngineLoad(1, 2, 256, long=2), EngineLoad(2, 40, 256), *busy]
    assert pick_lane(loads, 1) == 1  # joins the lane: its batch stays small
    full = [loads[0], EngineLoad(1, LANE_SEQS, 256, long=LANE_SEQS), loads[2], *busy]
    assert pick_lane(full, 1) == 2  # the lane is full: a new one where fewest samples run
    # A slow engine is no lane: empty at a third of the fleet's speed loses to one sample at full speed.
    slow = [EngineLoad(0, 0, 256, speed=1 / 3), EngineLoad(1, 1, 256), EngineLoad(2, 50, 256), EngineLoad(3, 50, 256)]
    assert pick_lane(slow, 1) == 1
    assert pick_lane(full, 1, avoid=frozenset({2})) == 0  # where it failed only if nothing else fits
    assert pick_lane([EngineLoad(0, 256, 256), EngineLoad(1, 0, 256, healthy=False)], 1) is None


def test_a_fleet_of_fewer_than_four_engines_has_no_lanes():
    # Two lanes on a pair left the real CPU pair running one to four samples for minutes (RESULTS.md, session 9).
    pair = [EngineLoad(0, 10, 256), EngineLoad(1, 10, 256)]
    assert not lane_to_spare(pair) and pick_lane(pair, 1) is None
    four = [*pair, EngineLoad(2, 10, 256), EngineLoad(3, 10, 256)]
    assert lane_to_spare(four) and pick_lane(four, 1) == 0
    sick = [*four[:3], EngineLoad(3, 10, 256, healthy=False)]
    assert not lane_to_spare(sick)  # healthy engines count


def test_on_a_pair_a_known_long_sample_runs_as_ordinary_work():
    async def main():
        ledger, engines, calls = Ledger(2), _engines(2, 8), []
        loop = asyncio.get_running_loop()
        group = ledger.open(Request("g", "p", n=1), loop.create_future(), 0.0)
        unit = ledger.unit(group, 1)
        unit.long = True
        ledger.enqueue(unit)
        for rid in ("a", "b"):
            ledger.enqueue(ledger.unit(ledger.open(Request(rid, "p", n=4), loop.create_future(), 0.0), 4))
        Admission(ledger, engines, Affinity(), clock=lambda: 0.0, wake=asyncio.Event(), start=calls.append,
                  pack_size=1, group_mode="together").round(global_cap=100)
        assert sorted(u.request.id for c in calls for u in c.units) == ["a", "b", "g"]  # nothing waits
        assert not unit.long and ledger.engine_long == [0, 0]  # no engine became a lane
        ledger.check()

    asyncio.run(main())


def _engines(n: int, cap: int) -> list[EngineSlot]:
    return [EngineSlot(i, SimpleNamespace(name=f"e{i}"), cap) for i in range(n)]


def test_a_sample_that_starts_over_is_marked_long_and_goes_to_a_lane_alone_ahead_of_new_work():
    async def main():
        ledger, engines, calls = Ledger(4), _engines(4, 8), []  # four engines: one may be a lane
        loop = asyncio.get_running_loop()
        for rid in ("a", "b"):  # new work, submitted first
            ledger.enqueue(ledger.unit(ledger.open(Request(rid, "p", n=4), loop.create_future(), 0.0), 4))
        group = ledger.open(Request("g", "p", n=2), loop.create_future(), 0.0)
        old = Prefix((1, 2, 3), Sample("xy", (7, 8), None, None, (Segment(0, 0, 2),)))  # tokens of version 0
        cont, fresh = ledger.split(ledger.unit(group, 2), [1, 1], [old, None])
        ledger.enqueue(cont, front=True)
        ledger.enqueue(fresh)
        sync = WeightSync(ledger, engines, resolver=Resolver(ledger), wake=asyncio.Event(), recheck=lambda r: None)
        assert sync.drop_stale(1) == 1  # version 2 adopted, max_staleness=1: its version-0 tokens are too old
        (again,) = [u for u in group.units if not u.done and u.queued and u is not fresh]
        assert again.long and again.prefix is None and not fresh.long
        Admission(ledger, engines, Affinity(), clock=lambda: 0.0, wake=asyncio.Event(), start=calls.append,
                  pack_size=8, group_mode="together").round(global_cap=100)
        first, *rest = calls
        assert first.units == [again] and first.engine == 0  # first, alone, on the emptiest engine
        assert rest and all(c.engine != 0 for c in rest)  # the lane gets no new work
        assert ledger.engine_long == [1, 0, 0, 0]
        ledger.check()
        ledger.end_call(first)  # its lane ends with it: an ordinary engine again
        assert ledger.engine_long == [0, 0, 0, 0]

    asyncio.run(main())


def test_a_group_whose_finished_piece_outlived_the_bound_starts_over_known_long():
    """A piece that finished under version 0 waits for a sibling that ran on across two updates: the group is
    generated again, and all of it is known long (its prompt drew an answer that outlived the bound)."""
    async def main():
        ledger, engines = Ledger(4), _engines(4, 8)
        group = ledger.open(Request("g", "p", n=2), asyncio.get_running_loop().create_future(), 0.0)
        done, running = ledger.split(ledger.unit(group, 2), [1, 1])
        ledger.finish(done, Result("g", (Sample("x", (5,), None, None, (Segment(0, 0, 1),)),)))
        sync = WeightSync(ledger, engines, resolver=Resolver(ledger), wake=asyncio.Event(), recheck=lambda r: None)
        assert sync.drop_stale(1) == 1  # version 2 adopted, max_staleness=1: the finished piece is too old
        (again,) = [u for u in group.units if u.queued]
        assert again.long and again.n == 1 and not running.long
        ledger.check()

    asyncio.run(main())


def test_the_pieces_of_a_known_long_unit_stay_known_long():
    async def main():
        ledger = Ledger(1)
        unit = ledger.unit(ledger.open(Request("g", "p", n=1), asyncio.get_running_loop().create_future(), 0.0), 1)
        unit.long = True
        cut = Prefix((1,), Sample("x", (5,), None, None, (Segment(1, 0, 1),)))
        (piece,) = ledger.split(unit, [1], [cut])  # cut by the next update, it continues from its tokens
        assert piece.long and piece.retry_priority < -1  # still a lane's, and before other requeued work

    asyncio.run(main())
