"""Engines joining, leaving, dying, going stale — and weight updates, as the dispatcher sees them.

An engine's life is one state machine (:mod:`rollout_plugin.pool.lifecycle`): live (in rotation),
suspect (a probe decides), dead (its calls move elsewhere under the same ids), restarting, stale
(running, but holding other weights than the pool's: out until refit), refitting, retired (out for
good; what it runs finishes there). Every change goes through :meth:`Membership._move` and its table;
when no engine can serve the current weights the pool fails, at once or after ``hopeless_s``. Weight updates pause
admission, cut or freeze in-flight calls as the mode says (:mod:`rollout_plugin.pool.weights`), and
resume under the new version.
"""

from __future__ import annotations

import asyncio
import logging

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.cuts import Cut
from rollout_plugin.pool.engine_client import EngineClient
from rollout_plugin.pool.lifecycle import EngineState, EngineView, Outlook, check, outlook, stuck_error
from rollout_plugin.pool.limits import Limits

log = logging.getLogger("rollout_plugin.pool.dispatch")

__all__ = ["Membership"]


class Membership:
    """Mixed into :class:`~rollout_plugin.pool.dispatch.Dispatcher` (its state lives there)."""

    # -- the engine state machine (rollout_plugin.pool.lifecycle) ---------------------------------
    def _move(self, index: int, new: EngineState, reason: str) -> EngineState:
        """Engine ``index`` goes to ``new`` for ``reason`` through the one table (an illegal transition raises:
        a bug); logged ``old -> new (reason)`` and recorded. Returns the old state. Callers then check whether
        the pool can still serve (:meth:`fail_if_hopeless`)."""
        e = self._engines[index]
        old = e.state
        check(e.client.name, old, new)
        e.state, e.why, e.before = new, reason, old
        level = (logging.ERROR if new is EngineState.dead else
                 logging.WARNING if new in (EngineState.suspect, EngineState.stale) else logging.INFO)
        log.log(level, "%s: %s -> %s (%s)", e.client.name, old, new, reason)
        self._on_change("health", e.client.name, old.value, new.value, reason)
        self._wake.set()
        return old

    def mark_dead(self, index: int, reason: str) -> None:
        """Take an engine out of rotation and move its in-flight work elsewhere under the same ids; a
        launched engine with restarts left starts restarting. Dead, restarting or retired: nothing to do."""
        e = self._engines[index]
        if e.state in (EngineState.dead, EngineState.restarting, EngineState.retired):
            return
        self._move(index, EngineState.dead, reason)
        moved = self._cancel_calls(lambda call: call.engine == index, Cut.DEAD)
        if moved:
            log.warning("%s: moving %d in-flight call(s) elsewhere", e.client.name, moved)
        self.restart(index, reason)

    def restart(self, index: int, reason: str) -> bool:
        """A dead engine restarts if its backend can (``recover``: it launched it, restarts are left)."""
        if self._engines[index].state is not EngineState.dead or not self._recover(index):
            self.fail_if_hopeless(f"{self._engines[index].client.name}: {reason}")
            return False
        self._move(index, EngineState.restarting, f"after: {reason}")
        self.fail_if_hopeless(reason)
        return True

    def mark_suspect(self, index: int, reason: str) -> bool:
        """A call failed as if the engine were down: out of rotation while a probe decides. False if it
        was not live (already suspect, or out)."""
        if self._engines[index].state is not EngineState.live:
            return False
        self._move(index, EngineState.suspect, reason)
        return True

    def clear_suspect(self, index: int, reason: str) -> None:
        """The probe of a suspect engine passed: back in rotation."""
        if self._engines[index].state is EngineState.suspect:
            self._move(index, EngineState.live, reason)

    def fail_if_hopeless(self, reason: str) -> None:
        """Can the pool still serve its current weights? No engine left: fail now. Engines running but none
        able to serve or be refit: fail after ``hopeless_s`` unless that changes (a source comes, an engine
        joins). ``reason``: the last thing that happened, for the error."""
        if self.failure is not None or self._closing:
            return
        refit, _ = self._can_refit()
        look = outlook([(e.state, e.before) for e in self._engines], weights_moved=self.weight_version != 0,
                       refit=refit)
        if look is Outlook.gone:
            self._hopeless_clock(None)
            self.fail(PoolError(f"every engine is dead; last: {reason}"))
        elif look is Outlook.stuck:
            if self._hopeless_timer is None:
                log.error("pool: serving -> stuck (no engine can serve weight version %d nor be refit; failing in "
                          "%g s unless that changes: %s)", self.weight_version, self.hopeless_s, reason)
                self._hopeless_clock(asyncio.get_running_loop().call_later(self.hopeless_s, self._hopeless))
        elif self._hopeless_timer is not None:
            log.info("pool: stuck -> serving (%s)", reason)
            self._hopeless_clock(None)

    def _hopeless_clock(self, timer: asyncio.TimerHandle | None) -> None:
        if self._hopeless_timer is not None:
            self._hopeless_timer.cancel()
        self._hopeless_timer = timer

    def _hopeless(self) -> None:
        """The stuck clock ran out: if still nothing can serve, every waiter gets PoolError saying why."""
        self._hopeless_timer = None
        if self.failure is not None or self._closing:
            return
        refit, source = self._can_refit()
        engines = [(e.state, e.before) for e in self._engines]
        if outlook(engines, weights_moved=self.weight_version != 0, refit=refit) is not Outlook.stuck:
            return
        views = [EngineView(e.client.name, e.state, e.why) for e in self._engines]
        self.fail(PoolError(stuck_error(views, self.weight_version, refit, source, self.hopeless_s)))

    def replace_client(self, index: int, client: EngineClient, *, stale: bool = False) -> EngineClient:
        """A restarted engine's fresh client, with the starting cap; returns the old client. It rejoins
        rotation at once, or (``stale``: it may hold other weights than the pool's) once :meth:`rejoin` says."""
        e = self._engines[index]
        old, e.client = e.client, client
        e.cap = self.limits.engine_inflight
        e.version, e.version_unknown = 0, True  # a fresh process holds the weights it started with
        if stale:
            self._move(index, EngineState.stale, "restarted with its initial weights; out until refit")
        else:
            self._move(index, EngineState.live, "restarted")
        self.fail_if_hopeless(f"{client.name}: restarted")
        return old

    def refitting(self, index: int, source: str) -> None:
        """A refit of stale engine ``index`` from ``source`` began."""
        self._move(index, EngineState.refitting, f"loading weight version {self.weight_version} from {source}")

    def refit_failed(self, index: int, reason: str) -> None:
        """A refit's load or check raised: stale again (the next source or sync may refit it)."""
        if self._engines[index].state is EngineState.refitting:
            self._move(index, EngineState.stale, f"refit failed: {reason}")
        self.fail_if_hopeless(f"{self._engines[index].client.name}: refit failed: {reason}")

    def rejoin(self, index: int, version: int | None) -> None:
        """A refit engine is back in rotation, holding ``version`` (None: it cannot say). An engine that left
        refitting meanwhile (lost, restarting) stays where it is."""
        e = self._engines[index]
        if e.state is not EngineState.refitting:
            log.warning("%s: refit ended, but the engine is %s now; it stays so", e.client.name, e.state)
            return
        if version is not None:
            self.set_engine_version(index, version)
        else:
            e.version = self.weight_version
        self._move(index, EngineState.live, f"refit to weight version {e.version}")
        self.fail_if_hopeless(f"{e.client.name}: refit")

    def stale_engines(self) -> list[str]:
        """Engines waiting for a refit (not those being refit)."""
        return [e.client.name for e in self._engines if e.state is EngineState.stale]

    def add_client(self, client: EngineClient, limits: Limits, *, stale: bool = False) -> int:
        """A new engine joins (a node joined, an engine was attached); returns its index. ``limits`` are the
        pool's for the new engine count: the global cap grows with the pool. ``stale``: out until refit."""
        self.limits = limits
        index = len(self._engines)
        self._engines.append(self._slot(index, client, limits.engine_inflight))
        self.ledger.add_engine()
        self._engines[index].state = EngineState.absent
        self._move(index, EngineState.stale if stale else EngineState.live, f"joined; {len(self._engines)} engines")
        self.fail_if_hopeless(f"{client.name}: joined")
        return index

    def retire(self, index: int, reason: str) -> None:
        """Take an engine out of rotation for good; what it runs finishes there (nothing is cancelled, and the
        pool does not fail for it: retiring is its caller's decision)."""
        if self._engines[index].state not in (EngineState.live, EngineState.suspect, EngineState.stale,
                                              EngineState.dead):
            return
        self.affinity.forget(index)
        self._move(index, EngineState.retired, reason)

    def give_up(self, index: int, reason: str) -> None:
        """A restart failed: the engine stays dead."""
        if self._engines[index].state is EngineState.restarting:
            self._move(index, EngineState.dead, reason)
        self.fail_if_hopeless(reason)

    # -- weight sync (the sequence that drives these: rollout_plugin.pool.update) ----------------------
    def pause(self) -> None:
        """Stop admitting new calls (queued work waits); in-flight calls go on."""
        if not self.paused:
            log.info("pool: running -> paused (weight sync)")
        self.paused = True

    def abort_inflight(self) -> int:
        """Cancel every running call and requeue its requests under the same ids; returns the count."""
        return self._cancel_calls(lambda call: True, Cut.ABORT)

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Until no call is in flight (admission should be paused first); False if ``timeout_s`` ran out."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self.ledger.calls:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait({c.task for c in self.ledger.calls if c.task is not None}, timeout=left)
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
        self.fail_if_hopeless(f"weight version {version} adopted")

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
        return self._cancel_calls(lambda call: True, reason)

    def mark_inflight(self, version: int) -> None:
        """Calls frozen across a ``keep`` update: tokens from here on were made under ``version``."""
        for call in self.ledger.calls:
            known = call.progress and not any(p.blind for parts in call.progress for p in parts)
            counts = [[len(p.token_ids) for p in parts] for parts in call.progress] if known else None
            call.marks.append((counts, version))

    def set_engine_version(self, index: int, version: int) -> None:
        """The version engine ``index`` reported holding (its results carry it)."""
        e = self._engines[index]
        if e.version != version or e.version_unknown:
            log.info("%s: weights %s -> %d", e.client.name, "?" if e.version_unknown else e.version, version)
        e.version, e.version_unknown = version, False

    def load_failed(self, index: int, reason: str) -> None:
        """A weight load into live engine ``index`` failed or was not verified: what it holds is unknown, so it
        leaves rotation (live -> stale, refit like a restarted engine). Calls frozen on it continue elsewhere
        from the tokens they had (made under the old weights, before the pause)."""
        e = self._engines[index]
        if e.state is not EngineState.live:  # dead, restarting, out already (a suspect one: its probe decides)
            return
        self._move(index, EngineState.stale, f"weight load failed: {reason}")
        e.version_unknown = True
        self._cancel_calls(lambda call: call.engine == index, Cut.CONTINUE)
        self.fail_if_hopeless(f"{e.client.name}: weight load failed: {reason}")

    def live_engines(self) -> list[str]:
        return [e.client.name for e in self._engines if e.healthy]

    def cut_stale(self, oldest: int) -> list[asyncio.Task]:
        """Cut every running call that carries tokens older than ``oldest`` — made by the call itself (sent
        under older weights) or in a continued sample's prefix; returns their tasks (settled, their units are
        queued again and :meth:`drop_stale` finds them)."""
        def stale(call) -> bool:
            return call.version < oldest or any(_prefix_oldest(u) < oldest for u in call.units)
        tasks = [c.task for c in self.ledger.calls if stale(c) and c.task is not None]
        cut = self._cancel_calls(stale, Cut.STALE)
        if cut:
            log.info("pool: %d call(s) cut: tokens older than weight version %d (max_staleness)", cut, oldest)
        return tasks

    def drop_stale(self, oldest: int) -> int:
        """Continued samples whose prefix holds tokens older than ``oldest`` start over (queued or backing off);
        returns how many."""
        dropped = 0
        for unit in [*self.ledger.queue.units(), *self.ledger.backoff]:
            if _prefix_oldest(unit) >= oldest:
                continue
            if unit.queued:
                self.ledger.queue.discard(unit)
            else:
                unit.timer.cancel()
                self.ledger.unhold(unit)
            (fresh,) = self.ledger.split(unit, [unit.n], [None])  # the sample is generated afresh
            self.ledger.enqueue(fresh, front=True)
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
        for ticket in list(self.ledger.tickets.values()):
            join = ticket.join
            if join is None or ticket.resolved:
                continue
            for part in list(join.order):
                result = join.results.get(part)
                if result is None or not result.ok or _result_oldest(result) >= oldest:
                    continue
                join.results[part] = None
                unit = self.ledger.unit(ticket, len(result.samples), part)
                self.ledger.enqueue(unit, front=True)
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
