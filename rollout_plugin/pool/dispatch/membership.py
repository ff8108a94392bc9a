"""Engines joining, leaving, dying, going stale: the engines' lifecycle, as the dispatcher sees it.

An engine's life is one state machine (:mod:`rollout_plugin.pool.core.lifecycle`): live (in rotation),
suspect (a probe decides), dead (its calls move elsewhere under the same ids), restarting, stale
(running, but holding other weights than the pool's: out until refit), refitting, retired (out for
good; what it runs finishes there). Every change goes through :meth:`Membership._move` and its table;
when no engine can serve the current weights the pool fails, at once or after ``hopeless_s``. What a weight
update does to in-flight work: :mod:`rollout_plugin.pool.dispatch.weight_sync`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.engine_client import EngineClient
from rollout_plugin.pool.core.ledger import Ledger
from rollout_plugin.pool.core.lifecycle import EngineState, EngineView, Outlook, Refit, check, outlook, stuck_error
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.pool.dispatch.resolver import PoolState, Resolver

log = logging.getLogger(__name__)

__all__ = ["Membership"]


class Membership:
    """Moves engines through their lifecycle (in and out of rotation) and fails the pool when none can serve.
    ``slot`` makes a new engine's slot; ``recover`` is asked when an engine dies (will it come back?);
    ``can_refit`` says how a stale engine gets the pool's weights (and the source's description)."""

    def __init__(self, ledger: Ledger, engines: list[EngineSlot], affinity: Affinity, *, pool: PoolState,
                 resolver: Resolver, wake: asyncio.Event, slot: Callable[[int, EngineClient, int], EngineSlot],
                 on_change: Callable[[str, str, object, object, str], None],
                 recover: Callable[[int], bool] | None = None,
                 can_refit: Callable[[], tuple[Refit, str | None]] | None = None, hopeless_s: float = 60.0):
        self._ledger, self._engines, self._affinity = ledger, engines, affinity
        self._pool, self._resolver, self._wake, self._slot = pool, resolver, wake, slot
        self._on_change = on_change
        self._recover = recover or (lambda index: False)
        self._can_refit = can_refit or (lambda: (Refit.none, None))
        self.hopeless_s = hopeless_s  # no engine can serve the current weights: fail after this long
        self._hopeless_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """The dispatcher stopped: no stuck clock may fire after it."""
        self._hopeless_clock(None)

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
        moved = self._resolver.cancel_calls(lambda call: call.engine == index, Cut.DEAD)
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
        if self._pool.failure is not None or self._pool.closing:
            return
        refit, _ = self._can_refit()
        look = outlook([(e.state, e.before) for e in self._engines], weights_moved=self._pool.weight_version != 0,
                       refit=refit)
        if look is Outlook.gone:
            self._hopeless_clock(None)
            self._pool.fail(PoolError(f"every engine is dead; last: {reason}"))
        elif look is Outlook.stuck:
            if self._hopeless_timer is None:
                log.error("pool: serving -> stuck (no engine can serve weight version %d nor be refit; failing in "
                          "%g s unless that changes: %s)", self._pool.weight_version, self.hopeless_s, reason)
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
        if self._pool.failure is not None or self._pool.closing:
            return
        refit, source = self._can_refit()
        engines = [(e.state, e.before) for e in self._engines]
        if outlook(engines, weights_moved=self._pool.weight_version != 0, refit=refit) is not Outlook.stuck:
            return
        views = [EngineView(e.client.name, e.state, e.why) for e in self._engines]
        self._pool.fail(PoolError(stuck_error(views, self._pool.weight_version, refit, source, self.hopeless_s)))

    def replace_client(self, index: int, client: EngineClient, cap: int, *, stale: bool = False) -> EngineClient:
        """A restarted engine's fresh client, with the starting ``cap``; returns the old client. It rejoins
        rotation at once, or (``stale``: it may hold other weights than the pool's) once :meth:`rejoin` says."""
        e = self._engines[index]
        old, e.client = e.client, client
        e.cap = cap
        e.version, e.version_unknown = 0, True  # a fresh process holds the weights it started with
        if stale:
            self._move(index, EngineState.stale, "restarted with its initial weights; out until refit")
        else:
            self._move(index, EngineState.live, "restarted")
        self.fail_if_hopeless(f"{client.name}: restarted")
        return old

    def refitting(self, index: int, source: str) -> None:
        """A refit of stale engine ``index`` from ``source`` began."""
        self._move(index, EngineState.refitting, f"loading weight version {self._pool.weight_version} from {source}")

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
            e.version = self._pool.weight_version
        self._move(index, EngineState.live, f"refit to weight version {e.version}")
        self.fail_if_hopeless(f"{e.client.name}: refit")

    def stale_engines(self) -> list[str]:
        """Engines waiting for a refit (not those being refit)."""
        return [e.client.name for e in self._engines if e.state is EngineState.stale]

    def add_client(self, client: EngineClient, cap: int, *, stale: bool = False) -> int:
        """A new engine joins (a node joined, an engine was attached) with ``cap``; returns its index.
        ``stale``: out until refit."""
        index = len(self._engines)
        self._engines.append(self._slot(index, client, cap))
        self._ledger.add_engine()
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
        self._affinity.forget(index)
        self._move(index, EngineState.retired, reason)

    def restart_failed(self, index: int, reason: str) -> None:
        """A restart failed: the engine stays dead."""
        if self._engines[index].state is EngineState.restarting:
            self._move(index, EngineState.dead, reason)
        self.fail_if_hopeless(reason)

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
        self._resolver.cancel_calls(lambda call: call.engine == index, Cut.CONTINUE)
        self.fail_if_hopeless(f"{e.client.name}: weight load failed: {reason}")

    def live_engines(self) -> list[str]:
        return [e.client.name for e in self._engines if e.healthy]
