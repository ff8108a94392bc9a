"""What a weight update does to the dispatcher: admission paused, in-flight calls cut or frozen, the new version
adopted, work older than the staleness bound started over.

The sequence that drives these (pause, freeze, load, verify, adopt, resume) and what each failure undoes:
:mod:`rollout_plugin.pool.weights.update`; how in-flight work crosses an update, by mode:
:mod:`rollout_plugin.pool.weights.sources`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.ledger import Ledger
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.pool.dispatch.resolver import Resolver

log = logging.getLogger(__name__)

__all__ = ["WeightSync"]


class WeightSync:
    """Owns whether admission is ``paused`` and the pool's ``weight_version``; ``recheck`` is asked after a version
    is adopted (can the pool still serve it? :meth:`Membership.fail_if_hopeless
    <rollout_plugin.pool.dispatch.membership.Membership.fail_if_hopeless>`)."""

    def __init__(self, ledger: Ledger, engines: Sequence[EngineSlot], *, resolver: Resolver, wake: asyncio.Event,
                 recheck: Callable[[str], None]):
        self._ledger, self._engines, self._resolver = ledger, engines, resolver
        self._wake, self._recheck = wake, recheck
        self.paused = False
        self.weight_version = 0

    def pause(self) -> None:
        """Stop admitting new calls (queued work waits); in-flight calls go on."""
        if not self.paused:
            log.info("pool: running -> paused (weight sync)")
        self.paused = True

    def abort_inflight(self) -> int:
        """Cancel every running call and requeue its requests under the same ids; returns the count."""
        return self._resolver.cancel_calls(lambda call: True, Cut.ABORT)

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Until no call is in flight (admission should be paused first); False if ``timeout_s`` ran out."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self._ledger.calls:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait({c.task for c in self._ledger.calls if c.task is not None}, timeout=left)
        return True

    def adopt_version(self, version: int, loaded: tuple[int, ...] = ()) -> None:
        """The pool's weights are ``version`` now: every later call is tagged with it. Engines that cannot say
        what they hold follow the pool, as do the ``loaded`` ones (the load went into them and nobody read
        back what they hold: ``pool.verify_weights=off``, or no ``/weight_info``)."""
        if version != self.weight_version:
            log.info("pool: weight version %d -> %d (adopted)", self.weight_version, version)
        self.weight_version = version
        for e in self._engines:
            if e.version_unknown or e.index in loaded:
                e.version = version
        self._recheck(f"weight version {version} adopted")

    def resume(self, weight_version: int | None = None, *, max_staleness: int | None = None) -> None:
        """Admit again; ``weight_version``: adopt it first (the caller loaded it outside the pool's sequence).
        ``max_staleness`` here cuts and sweeps at once; the update sequence also waits for the cut calls to
        settle before it admits again (:meth:`cut_stale`, :meth:`drop_stale`)."""
        if weight_version is not None:
            self.adopt_version(weight_version)
        if max_staleness is not None:
            self.cut_stale(self.weight_version - max_staleness)
            self.drop_stale(self.weight_version - max_staleness)
        if self.paused:
            log.info("pool: paused -> running (weight version %d)", self.weight_version)
        self.paused = False
        self._wake.set()

    def cut_inflight(self, reason: Cut | str) -> int:
        """Cut every running call; with ``Cut.CONTINUE`` its samples continue from what streamed in."""
        return self._resolver.cancel_calls(lambda call: True, reason)

    def mark_inflight(self, version: int) -> None:
        """Calls frozen across a ``keep`` update: tokens from here on were made under ``version``."""
        for call in self._ledger.calls:
            known = call.progress and not any(p.blind for parts in call.progress for p in parts)
            counts = [[len(p.token_ids) for p in parts] for parts in call.progress] if known else None
            call.marks.append((counts, version))

    def cut_stale(self, oldest: int) -> list[asyncio.Task]:
        """Cut every running call that carries tokens older than ``oldest`` — made by the call itself (sent
        under older weights) or in a continued sample's prefix; returns their tasks (settled, their units are
        queued again and :meth:`drop_stale` finds them)."""
        def stale(call) -> bool:
            return call.version < oldest or any(_prefix_oldest(u) < oldest for u in call.units)
        tasks = [c.task for c in self._ledger.calls if stale(c) and c.task is not None]
        cut = self._resolver.cancel_calls(stale, Cut.STALE)
        if cut:
            log.info("pool: %d call(s) cut: tokens older than weight version %d (max_staleness)", cut, oldest)
        return tasks

    def drop_stale(self, oldest: int) -> int:
        """Continued samples whose prefix holds tokens older than ``oldest`` start over (queued or backing off);
        returns how many."""
        dropped = 0
        for unit in [*self._ledger.queue.units(), *self._ledger.backoff]:
            if _prefix_oldest(unit) >= oldest:
                continue
            if unit.queued:
                self._ledger.queue.discard(unit)
            else:
                unit.timer.cancel()
                self._ledger.end_back_off(unit)
            (fresh,) = self._ledger.split(unit, [unit.n], [None])  # the sample is generated afresh
            fresh.long = True  # too long for a loaded batch within the bound: a lane this time (policy/lanes.py)
            self._ledger.enqueue(fresh, front=True)
            dropped += 1
        dropped += self._reopen_stale_parts(oldest)
        if dropped:
            log.info("pool: %d continued sample(s) or finished piece(s) start over: their tokens predate weight "
                     "version %d", dropped, oldest)
        return dropped

    def _reopen_stale_parts(self, oldest: int) -> int:
        """Pieces of a group that finished with tokens older than ``oldest`` wait in the group for their
        siblings: generated again, or the group's result would carry them."""
        reopened = 0
        for ticket in list(self._ledger.tickets.values()):
            join = ticket.join
            if join is None or ticket.resolved:
                continue
            for part in list(join.order):
                result = join.results.get(part)
                if result is None or not result.ok or _result_oldest(result) >= oldest:
                    continue
                join.results[part] = None
                unit = self._ledger.unit(ticket, len(result.samples), part)
                # Known long, as the sibling that outlived the bound: its prompt draws long answers, and in a loaded
                # batch the group would miss the bound again (benchmarks/RESULTS.md, session 10: the last step's
                # wait went from a whole 16k decode to ~55 s on five of six seeds at 64 engines).
                unit.long = True
                self._ledger.enqueue(unit, front=True)
                reopened += 1
        return reopened


def _result_oldest(result) -> float:
    """The oldest weight version any of a finished piece's tokens came from."""
    return min((seg.version for s in result.samples for seg in s.segments), default=float("inf"))


def _prefix_oldest(unit) -> float:
    """The oldest weight version in a unit's continued prefix (inf: no prefix)."""
    if unit.prefix is None:
        return float("inf")
    return min((seg.version for seg in unit.prefix.sample.segments), default=float("inf"))
