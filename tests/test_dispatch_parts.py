"""The dispatcher's parts work alone, on what each is handed (issue 20: composed parts instead of mixins).

Placement is one call, :meth:`Admission.place`: where a unit goes, whether it waits aside, and the round's one
reservation. The resolve path and the weight-sync part run on a bare ledger, without a dispatcher. A weight
source is handed the engines' fan-out (``EngineControl``), not the pool.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.ledger import Ledger
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.pool.dispatch.admission import Admission, Loads
from rollout_plugin.pool.dispatch.resolver import Resolver
from rollout_plugin.pool.dispatch.weight_sync import WeightSync
from rollout_plugin.types import Request


def _engines(caps_inflight: list[tuple[int, int]], ledger: Ledger) -> list[EngineSlot]:
    slots = []
    for i, (cap, inflight) in enumerate(caps_inflight):
        slots.append(EngineSlot(i, SimpleNamespace(name=f"e{i}"), cap))
        ledger.engine_samples[i] = inflight
    return slots


def _admission(ledger: Ledger, engines: list[EngineSlot], affinity: Affinity | None = None) -> Admission:
    return Admission(ledger, engines, affinity or Affinity(), clock=lambda: 0.0, wake=asyncio.Event(),
                     start=lambda call: None, pack_size=8, group_mode="together")


def _unit(ledger: Ledger, rid: str, n: int, affinity: str | None = None):
    ticket = ledger.open(Request(rid, "p", n=n, affinity=affinity), asyncio.get_running_loop().create_future(), 0.0)
    return ledger.unit(ticket, n)


def test_place_sends_or_blocks_and_only_the_first_blocked_unit_reserves_an_engine():
    async def main():
        ledger = Ledger(2)
        engines = _engines([(4, 3), (4, 2)], ledger)  # room 1 and 2
        admission, loads = _admission(ledger, engines), Loads(engines, ledger)
        assert admission.place(_unit(ledger, "fits", 2), loads).parts == ((1, 2),)
        blocked = admission.place(_unit(ledger, "big", 4), loads)
        assert blocked.parts == () and not blocked.aside
        assert loads.reserved and not loads.view[1].healthy  # the engine with most room waits for it
        assert admission.place(_unit(ledger, "small", 1), loads).parts == ((0, 1),)  # younger work goes around
        admission.place(_unit(ledger, "big2", 3), loads)
        assert loads.view[0].healthy  # a second blocked unit reserves nothing

    asyncio.run(main())


def test_place_sets_an_affinity_unit_aside_while_its_home_is_full_and_reserves_nothing_for_it():
    async def main():
        ledger = Ledger(2)
        engines = _engines([(4, 4), (4, 2)], ledger)  # its home e0 is full; e1 has room
        affinity = Affinity()
        affinity.placed("s", 0, 2)  # two of e0's samples are the key's own: e0 is not far fuller than e1
        loads = Loads(engines, ledger)
        waits = _admission(ledger, engines, affinity).place(_unit(ledger, "turn", 1, affinity="s"), loads)
        assert waits.aside and waits.parts == () and not loads.reserved

    asyncio.run(main())


def test_weight_sync_and_the_resolver_run_on_a_bare_ledger():
    async def main():
        ledger = Ledger(1)
        engines = _engines([(4, 0)], ledger)
        wake, checks = asyncio.Event(), []
        sync = WeightSync(ledger, engines, resolver=Resolver(ledger), wake=wake, recheck=checks.append)
        sync.pause()
        assert sync.paused
        sync.adopt_version(3)
        assert sync.weight_version == 3 and engines[0].version == 3 and checks == ["weight version 3 adopted"]
        sync.resume()
        assert not sync.paused and wake.is_set()
        ticket = ledger.open(Request("r", "p"), asyncio.get_running_loop().create_future(), 0.0)
        Resolver(ledger).resolve(ticket, error=RuntimeError("x"), outcome="failed")
        assert ticket.resolved and ledger.outcomes["failed"] == 1

    asyncio.run(main())


def test_a_weight_source_is_handed_the_engine_fan_out_not_the_pool():
    """``WeightSource.load`` gets a narrow control (engine names and the RPC fan-out): an update and a refit both.
    Before, it was handed the whole RolloutPool (``submit``, ``pause``, the dispatcher behind it)."""
    from vllm_like import VllmLike

    from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
    from rollout_plugin.pool import RolloutPool
    from rollout_plugin.pool.weights.sources import FolderWeights
    from rollout_plugin.sim.loop import run_virtual

    class Recording:
        description = "recording"

        def __init__(self):
            self.handed: list = []

        async def load(self, control, engines) -> None:
            self.handed.append((control, list(engines), control.engine_names))
            await FolderWeights("w1").load(control, engines)  # the real source works on what it is handed

    async def main():
        engines = [VllmLike("e0"), VllmLike("e1")]
        for e in engines:
            e.folders = {"w1": 1}
        pool = RolloutPool(pool=PoolConfig(per_engine=4), controller=ControllerConfig(mode=ControllerMode.off),
                           clients=engines, clock=asyncio.get_running_loop().time)
        async with pool:
            source = Recording()
            assert await pool.update_weights(1, source) == 1
            (control, names, known), = source.handed
            assert names == known == ["e0", "e1"]
            assert not any(hasattr(control, attr) for attr in ("submit", "pause", "update_weights", "_require"))

    run_virtual(main())
