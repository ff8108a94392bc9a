"""Engines joining, leaving, dying, going stale — and weight updates, as the dispatcher sees them.

An engine is healthy (in rotation), suspect (a probe decides), dead (its calls move elsewhere under
the same ids; a restart may bring it back), stale (running, but holding other weights than the pool's:
out until refit) or retired (out for good; what it runs finishes there). Weight updates pause
admission, cut or freeze in-flight calls as the mode says (:mod:`rollout_plugin.pool.weights`), and
resume under the new version.
"""

from __future__ import annotations

import asyncio
import logging

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.engine_client import EngineClient
from rollout_plugin.pool.limits import Limits

log = logging.getLogger("rollout_plugin.pool.dispatch")

__all__ = ["Membership"]


class Membership:
    """Mixed into :class:`~rollout_plugin.pool.dispatch.Dispatcher` (its state lives there)."""

    def mark_dead(self, index: int, reason: str) -> None:
        """Take an engine out of rotation and move its in-flight work elsewhere under the same ids."""
        e = self._engines[index]
        if not e.healthy:
            return
        e.healthy = False
        moved = self._cancel_calls(lambda call: call.engine == index, "dead")
        log.error("%s: healthy -> dead (%s); moving %d in-flight call(s)", e.client.name, reason, moved)
        e.recovering = self._recover(index)
        self._on_change("health", e.client.name, "healthy", "dead", reason)
        self.fail_if_hopeless(f"{e.client.name}: {reason}")
        self._wake.set()

    def fail_if_hopeless(self, reason: str) -> None:
        """No engine healthy and none coming back: the pool cannot go on."""
        if not any(x.healthy or x.recovering or x.stale for x in self._engines):
            self.fail(PoolError(f"every engine is dead; last: {reason}"))

    def replace_client(self, index: int, client: EngineClient, *, stale: bool = False) -> EngineClient:
        """A restarted engine's fresh client, with the starting cap; returns the old client. It rejoins
        rotation at once, or (``stale``: it may hold other weights than the pool's) once :meth:`rejoin` says."""
        e = self._engines[index]
        old, e.client = e.client, client
        e.suspect, e.recovering, e.cap = False, False, self.limits.engine_inflight
        e.version, e.version_unknown = 0, True  # a fresh process holds the weights it started with
        if stale:
            e.healthy, e.stale = False, True
            log.warning("%s: dead -> stale (restarted with its initial weights; out until refit)", client.name)
            self._on_change("health", client.name, "dead", "stale", "restarted")
        else:
            e.healthy = True
            log.info("%s: dead -> healthy (restarted)", client.name)
            self._on_change("health", client.name, "dead", "healthy", "restarted")
        self._wake.set()
        return old

    def rejoin(self, index: int, version: int | None) -> None:
        """A stale engine was refit: back in rotation, holding ``version`` (None: it cannot say)."""
        e = self._engines[index]
        e.stale, e.healthy = False, True
        if version is not None:
            self.set_engine_version(index, version)
        else:
            e.version = self.weight_version
        log.info("%s: stale -> healthy (refit to weight version %d)", e.client.name, e.version)
        self._on_change("health", e.client.name, "stale", "healthy", "refit")
        self._wake.set()

    def stale_engines(self) -> list[str]:
        return [e.client.name for e in self._engines if e.stale]

    def add_client(self, client: EngineClient, limits: Limits, *, stale: bool = False) -> int:
        """A new engine joins (a node joined, an engine was attached); returns its index. ``limits`` are the
        pool's for the new engine count: the global cap grows with the pool. ``stale``: out until refit."""
        self.limits = limits
        index = len(self._engines)
        self._engines.append(self._slot(index, client, limits.engine_inflight))
        self.ledger.add_engine()
        e = self._engines[index]
        e.healthy, e.stale = not stale, stale
        state = "stale" if stale else "healthy"
        log.info("%s: absent -> %s (joined; %d engines)", client.name, state, len(self._engines))
        self._on_change("health", client.name, "absent", state, "joined")
        self._wake.set()
        return index

    def retire(self, index: int, reason: str) -> None:
        """Take an engine out of rotation for good; what it runs finishes there (nothing is cancelled)."""
        e = self._engines[index]
        if not e.healthy:
            return
        e.healthy, e.recovering = False, False
        self.affinity.forget(index)
        log.info("%s: healthy -> retired (%s)", e.client.name, reason)
        self._on_change("health", e.client.name, "healthy", "retired", reason)
        self._wake.set()

    def give_up(self, index: int, reason: str) -> None:
        """A restart failed: the engine stays dead."""
        self._engines[index].recovering = False
        self.fail_if_hopeless(reason)
        self._wake.set()

    # -- weight sync ------------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop admitting new calls (queued work waits); in-flight calls go on."""
        if not self.paused:
            log.info("pool: running -> paused (weight sync)")
        self.paused = True

    def abort_inflight(self) -> int:
        """Cancel every running call and requeue its requests under the same ids; returns the count."""
        return self._cancel_calls(lambda call: True, "abort")

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

    def resume(self, weight_version: int | None = None, *, max_staleness: int | None = None) -> None:
        if weight_version is not None:
            self.weight_version = weight_version
            for e in self._engines:
                if e.version_unknown:  # it cannot say what it holds: it follows the pool
                    e.version = weight_version
        if max_staleness is not None:
            self._drop_stale(self.weight_version - max_staleness)
        if self.paused:
            log.info("pool: paused -> running (weight version %d)", self.weight_version)
        self.paused = False
        self._wake.set()

    def cut_inflight(self, reason: str) -> int:
        """Cut every running call; with ``reason="continue"`` its samples continue from what streamed in."""
        return self._cancel_calls(lambda call: True, reason)

    def mark_inflight(self, version: int) -> None:
        """Calls frozen across a ``keep`` update: tokens from here on were made under ``version``."""
        for call in self.ledger.calls:
            counts = [[len(p.token_ids) for p in parts] for parts in call.progress] if call.progress else None
            call.marks.append((counts, version))

    def set_engine_version(self, index: int, version: int) -> None:
        """The version engine ``index`` reported holding (its results carry it)."""
        e = self._engines[index]
        if e.version != version or e.version_unknown:
            log.info("%s: weights %s -> %d", e.client.name, "?" if e.version_unknown else e.version, version)
        e.version, e.version_unknown = version, False

    def live_engines(self) -> list[str]:
        return [e.client.name for e in self._engines if e.healthy]

    def _drop_stale(self, oldest: int) -> None:
        """Work older than ``oldest`` starts over: continued samples lose their prefix, frozen calls are cut."""
        self._cancel_calls(lambda call: call.version < oldest, "stale")
        for unit in list(self.ledger.queue.units()):
            if unit.prefix is not None and min(s.version for s in unit.prefix.sample.segments) < oldest:
                self.ledger.queue.discard(unit)
                (fresh,) = self.ledger.split(unit, [unit.n], [None])  # the sample is generated afresh
                self.ledger.enqueue(fresh, front=True)


