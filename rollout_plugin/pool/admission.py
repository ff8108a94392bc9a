"""The admission round: which queued units go to which engine now (the dispatcher's policy half).

Oldest first; a unit that fits nowhere now does not hold up smaller ones (the oldest blocked one
reserves the engine it will fit on); packs compatible units into one call up to the engine's room,
the pack size and the global room, all counted in samples. Routing decisions are
:mod:`rollout_plugin.pool.routing`'s (pure); this module applies them to the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from rollout_plugin.pool.engine_client import new_progress
from rollout_plugin.pool.ledger import Unit
from rollout_plugin.pool.routing import EngineLoad, pick_engine, pick_near, split_group

log = logging.getLogger("rollout_plugin.pool.dispatch")

__all__ = ["Admission"]


class Admission:
    """Mixed into :class:`~rollout_plugin.pool.dispatch.Dispatcher` (its state lives there)."""

    def _load(self, index: int) -> EngineLoad:
        e = self._engines[index]
        return EngineLoad(index, self.ledger.engine_samples[index], e.cap, e.available, e.speed)

    def _dispatch(self) -> None:
        """Admit the oldest work that fits, as long as anything fits (one admission round)."""
        if self.paused or self._closing or self.failure is not None:
            return
        queue = self.ledger.queue
        loads = [self._load(i) for i in range(len(self._engines))]  # this round's view, kept current
        reserved = False
        global_cap = self.global_cap  # (a sum over the engines: once a round)
        below_n: int | None = None  # units this large found no room this round; so won't larger ones
        try:
            while queue.size:
                room = global_cap - self.ledger.samples_inflight
                if room <= 0 or not any(x.room for x in loads):
                    return  # at the global cap, or every engine at its own: the next call to end wakes us
                key = queue.oldest(below_n)
                if key is None:
                    return
                unit = queue.head(key)
                if unit is None:
                    continue
                if unit.n > room:
                    return  # the oldest waits for global room; younger work does not pass it
                parts = self._place(unit, loads)
                if not parts and unit.request.affinity is not None and pick_engine(loads, unit.n) is not None:
                    queue.set_aside(key)  # it waits for room on its own engine; others may go
                    continue
                if not parts:
                    if not reserved:  # the oldest blocked unit keeps the engine it waits for
                        reserved = True
                        for i in self._reserve(unit, loads):
                            loads[i] = EngineLoad(i, loads[i].inflight, loads[i].cap, False, loads[i].speed)
                    below_n = unit.n if below_n is None else min(below_n, unit.n)
                    continue
                if len(parts) > 1:
                    self._send_split(self.ledger.take(key), parts)
                elif self._hold_for_pack(key, unit, budget := min(loads[parts[0][0]].room,
                                                                  max(self.pack_size, unit.n), room)):
                    queue.set_aside(key)
                    continue
                else:
                    self._send(parts[0][0], self._batch(key, budget))
                for i, _ in parts:
                    loads[i] = self._load(i)
        finally:
            queue.restore()

    def _place(self, unit: Unit, loads: list[EngineLoad]) -> list[tuple[int, int]]:
        key = unit.request.affinity
        if key is not None:
            home, own = self.affinity.home(key)
            idx = pick_near(loads, unit.n, unit.avoid, home, own, self.split_threshold)
            return [(idx, unit.n)] if idx is not None else []
        if unit.part is None and unit.n > 1 and self.group_mode == "auto":
            return split_group(loads, unit.n, unit.avoid, self.split_threshold)
        idx = pick_engine(loads, unit.n, unit.avoid)
        return [(idx, unit.n)] if idx is not None else []

    def _reserve(self, unit: Unit, loads: list[EngineLoad]) -> list[int]:
        """The engine a blocked unit will fit on once it drains (none if no engine's cap holds it: the
        controller's floor raises caps to the largest pending n)."""
        fits = [x for x in loads if x.healthy and x.cap >= unit.n]
        return [max(fits, key=lambda x: (x.room, -x.index)).index] if fits else []

    def _batch(self, key: tuple, budget: int) -> list[Unit]:
        queue = self.ledger.queue
        batch = [self.ledger.take(key)]
        budget -= batch[0].n
        if batch[0].alone:
            return batch
        while (nxt := queue.head(key)) is not None and nxt.n <= budget:
            batch.append(self.ledger.take(key))
            budget -= nxt.n
        return batch

    def _hold_for_pack(self, key: tuple, unit: Unit, budget: int) -> bool:
        """Wait for more compatible requests (up to the pack timeout) rather than send a small pack."""
        if self.pack_timeout_s <= 0 or unit.alone or unit.part is not None:
            return False
        if self.ledger.queue.samples_by_key.get(key, 0) >= budget:
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
        for piece, (idx, _) in zip(self.ledger.split(unit, [n for _, n in parts]), parts):
            self._send(idx, [piece])

    def _send(self, index: int, units: list[Unit]) -> None:
        now = self._clock()
        e = self._engines[index]
        before = self.ledger.engine_samples[index]
        call = self.ledger.start_call(index, units, e.version, now)
        if getattr(e.client, "reports_progress", False):  # tokens so far survive a cut (engine death, weights)
            call.progress = new_progress([u.request for u in units])
        e.account(before, self.ledger.engine_samples[index], now)
        for u in units:
            if u.request.affinity is not None:
                self.affinity.placed(u.request.affinity, index, u.n)
        call.task = asyncio.get_running_loop().create_task(self._call(call), name=f"{e.client.name}-call")
        call.task.add_done_callback(functools.partial(self._call_done, call))

