"""The admission round: which queued units go to which engine now, and their calls started.

Oldest first; a unit that fits nowhere now does not hold up smaller ones (the oldest blocked one
reserves the engine it will fit on); packs compatible units into one call up to the engine's room,
the pack size and the global room, all counted in samples. Where one unit goes is :meth:`Admission.place`
alone (routing's pure decisions, :mod:`rollout_plugin.pool.policy.routing`, plus waiting and reservation);
this module applies it to the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.engine_client import new_progress
from rollout_plugin.pool.core.ledger import Call, Ledger, Unit
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.pool.policy.lanes import lane_to_spare, pick_lane
from rollout_plugin.pool.policy.routing import EngineLoad, pick_engine, pick_near, split_group

log = logging.getLogger(__name__)

__all__ = ["Admission", "Loads", "Placement"]


@dataclass(frozen=True)
class Placement:
    """Where a unit goes now: ``parts`` (engine, samples), more than one when a group splits; none: it waits,
    ``aside`` (for room on its own affinity engine: younger work may pass) or blocked."""

    parts: tuple[tuple[int, int], ...] = ()
    aside: bool = False


class Loads:
    """One admission round's view of the engines (kept current as calls start) and its one reservation."""

    def __init__(self, engines: Sequence[EngineSlot], ledger: Ledger):
        self._engines, self._ledger = engines, ledger
        self.view = [self._look(i) for i in range(len(engines))]
        self.reserved = False

    def _look(self, index: int) -> EngineLoad:
        e = self._engines[index]
        return EngineLoad(index, self._ledger.engine_samples[index], e.cap, e.available, e.speed,
                          self._ledger.engine_long[index])

    def refresh(self, index: int) -> None:
        self.view[index] = self._look(index)

    def any_room(self) -> bool:
        return any(x.room for x in self.view)

    def reserve(self, unit: Unit) -> None:
        """The round's first blocked unit (the oldest) keeps the engine it will fit on once that drains: nothing
        else goes there this round. None if no engine's cap holds it (the controller's floor raises caps to the
        largest pending n); later blocked units reserve nothing."""
        if self.reserved:
            return
        self.reserved = True
        fits = [x for x in self.view if x.healthy and x.cap >= unit.n]
        if fits:
            x = max(fits, key=lambda x: (x.room, -x.index))
            self.view[x.index] = EngineLoad(x.index, x.inflight, x.cap, False, x.speed)


class Admission:
    """Admits queued units onto engines within their caps and the global one; ``start`` runs a call."""

    def __init__(self, ledger: Ledger, engines: Sequence[EngineSlot], affinity: Affinity, *,
                 clock: Callable[[], float], wake: asyncio.Event, start: Callable[[Call], None], pack_size: int,
                 group_mode: str = "auto", split_threshold: float = 0.25, pack_timeout_s: float = 0.0):
        self._ledger, self._engines, self._affinity = ledger, engines, affinity
        self._clock, self._wake, self._start = clock, wake, start
        self.pack_size = pack_size
        # GRPO groups: "auto" keeps n=k on one engine unless the split gate opens (routing.split_group),
        # "together" never splits, "split" sends every sample as its own unit.
        self.group_mode = group_mode
        self.split_threshold = split_threshold
        self.pack_timeout_s = pack_timeout_s  # distllm's batch timeout: wait this long for a pack to fill
        self.groups_split = 0
        self._pack_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._pack_timer is not None:
            self._pack_timer.cancel()

    def round(self, global_cap: int) -> None:
        """Admit the oldest work that fits, as long as anything fits (one admission round)."""
        queue = self._ledger.queue
        loads = Loads(self._engines, self._ledger)  # this round's view, kept current
        below_n: int | None = None  # units this large found no room this round; so won't larger ones
        try:
            while queue.size:
                room = global_cap - self._ledger.samples_inflight
                if room <= 0 or not loads.any_room():
                    return  # at the global cap, or every engine at its own: the next call to end wakes us
                key = queue.oldest(below_n)
                if key is None:
                    return
                unit = queue.head(key)
                if unit is None:
                    continue
                if unit.n > room:
                    return  # the oldest waits for global room; younger work does not pass it
                placement = self.place(unit, loads)
                if placement.aside:
                    queue.set_aside(key)  # it waits for room on its own engine; others may go
                    continue
                parts = list(placement.parts)
                if not parts:
                    below_n = unit.n if below_n is None else min(below_n, unit.n)
                    continue
                if len(parts) > 1:
                    self._send_split(self._ledger.take(key), parts)
                elif self._hold_for_pack(key, unit, budget := min(loads.view[parts[0][0]].room,
                                                                  max(self.pack_size, unit.n), room)):
                    queue.set_aside(key)
                    continue
                else:
                    self._send(parts[0][0], self._batch(key, budget))
                for i, _ in parts:
                    loads.refresh(i)
        finally:
            queue.restore()

    def place(self, unit: Unit, loads: Loads) -> Placement:
        """Where ``unit`` goes now on this round's ``loads``: an affinity key's engine or one near it; a group
        whole or split (``group_mode`` auto); else the engine routing picks. If nowhere: an affinity unit that
        would fit elsewhere waits aside; any other is blocked, and the round's first blocked unit reserves the
        engine it waits for (:meth:`Loads.reserve`)."""
        parts = self._route(unit, loads.view)
        if parts:
            return Placement(tuple(parts))
        if unit.request.affinity is not None and pick_engine(loads.view, unit.n) is not None:
            return Placement(aside=True)
        loads.reserve(unit)
        return Placement()

    def _route(self, unit: Unit, loads: list[EngineLoad]) -> list[tuple[int, int]]:
        if unit.long:  # known long: a lane (its prefix cache, if any, went with the weights)
            idx = pick_lane(loads, unit.n, unit.avoid)
            if idx is not None:
                return [(idx, unit.n)]
            if lane_to_spare(loads):
                return []  # a lane may open once an engine has room: it waits for one
            unit.long = False  # no lane to spare in this fleet: it runs as ordinary work (policy/lanes.py)
        key = unit.request.affinity
        if key is not None:
            home, own = self._affinity.home(key, self._clock())
            idx = pick_near(loads, unit.n, unit.avoid, home, own, self.split_threshold)
            return [(idx, unit.n)] if idx is not None else []
        if unit.part is None and unit.n > 1 and self.group_mode == "auto":
            return split_group(loads, unit.n, unit.avoid, self.split_threshold)
        idx = pick_engine(loads, unit.n, unit.avoid)
        return [(idx, unit.n)] if idx is not None else []

    def _batch(self, key: tuple, budget: int) -> list[Unit]:
        queue = self._ledger.queue
        batch = [self._ledger.take(key)]
        budget -= batch[0].n
        if batch[0].alone:
            return batch
        while (nxt := queue.head(key)) is not None and nxt.n <= budget:
            batch.append(self._ledger.take(key))
            budget -= nxt.n
        return batch

    def _hold_for_pack(self, key: tuple, unit: Unit, budget: int) -> bool:
        """Wait for more compatible requests (up to the pack timeout) rather than send a small pack."""
        if self.pack_timeout_s <= 0 or unit.alone or unit.part is not None:
            return False
        if self._ledger.queue.samples_by_key.get(key, 0) >= budget:
            return False
        wait = unit.ticket.queued_at + self.pack_timeout_s - self._clock()
        if wait <= 0:
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()  # re-arm unless a timer is due in (now, now + wait]: a fired one is never cleared
        if self._pack_timer is None or not now < self._pack_timer.when() <= now + wait:
            if self._pack_timer is not None:
                self._pack_timer.cancel()
            self._pack_timer = loop.call_later(wait, self._wake.set)
        return True

    def _send_split(self, unit: Unit, parts: list[tuple[int, int]]) -> None:
        """Send a group's samples to several engines, as pieces that join into one result."""
        self.groups_split += 1
        log.debug("%s: group of %d split (%s)", unit.ticket.request.id, unit.n,
                  ", ".join(f"{self._engines[i].client.name}×{n}" for i, n in parts))
        for piece, (idx, _) in zip(self._ledger.split(unit, [n for _, n in parts]), parts):
            self._send(idx, [piece])

    def _send(self, index: int, units: list[Unit]) -> None:
        now = self._clock()
        e = self._engines[index]
        before = self._ledger.engine_samples[index]
        call = self._ledger.start_call(index, units, e.version, now)
        if getattr(e.client, "reports_progress", False):  # tokens so far survive a cut (engine death, weights)
            call.progress = new_progress([u.request for u in units])
        e.account(before, self._ledger.engine_samples[index], now)
        for u in units:
            if u.request.affinity is not None:
                self._remember(u, index, now)
        self._start(call)

    def _remember(self, unit: Unit, index: int, now: float) -> None:
        """Note where ``unit``'s affinity keys went. A home out of rotation (suspect after a failed call, dead,
        restarting, stale: its prefix cache is gone or useless) moves here, so the key's next request follows
        this one instead of going wherever is least loaded each time."""
        keys = unit.request.affinity
        home, _ = self._affinity.home(keys, now)
        gone = home is not None and home != index and home < len(self._engines) and not self._engines[home].available
        self._affinity.placed(keys, index, unit.n, now, rehome=gone)

