"""A weight update as one serialized sequence whose every failure undoes what came before.

::

    pause admission -> freeze / abort / drain (by mode) -> load -> verify -> adopt -> resume

One update at a time: every front end (``RolloutPool.update_weights`` and ``weight_update``, refits of stale
engines, the gateway's ``/admin/reload_weights``, the TRL adapters) runs through :func:`update_sequence` under the
pool's one :class:`UpdateGate`. Admission pauses when an update is *asked for* and reopens when the last
pending one ends, so two overlapping updates never admit work between them.

What each step undoes when a later one fails (or the caller is cancelled):

- **freeze** (``keep``: ``/pause?mode=keep``; ``continue``: ``/pause?mode=abort``): every engine sent ``/pause``
  gets ``/resume`` — also those whose ``/pause`` failed, since a pause that timed out may have landed and vLLM's
  resume of an engine that is not paused does nothing (``vllm/v1/engine/core.py`` ``resume_scheduler``). A paused
  vLLM queues every call until ``/resume`` (``vllm/entrypoints/rl/online/api_router.py``): an engine left paused
  hangs its callers.
- **load / verify**: the engines the load was pointed at may hold anything (vLLM's ``reload_weights`` can fail
  half-way): they leave rotation as *stale* (:meth:`Membership.load_failed`), their frozen calls continue
  elsewhere, and the pool refits them from its last weight source where it holds one. The pool's version stays
  the old one and no engine keeps the new version's tag: nothing adopts a version it did not load.
- **adopt**: nothing after it can fail; ``max_staleness`` is applied before admission reopens: calls carrying
  tokens older than ``version - max_staleness`` (their own or their continued prefix's) are cut and, once
  settled, start over, as do queued and backing-off continued samples (:meth:`WeightSync.cut_stale`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rollout_plugin.config.schema import WeightVerify
from rollout_plugin.errors import EngineError, PoolError
from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.engine_client import CallError, EngineClient
from rollout_plugin.pool.weights.sources import ABORT_GRACE_S, UpdateMode, WeightSource, check_identity, engine_pause

if TYPE_CHECKING:
    from rollout_plugin.pool.dispatch.dispatcher import Dispatcher
    from rollout_plugin.pool.api.pool import RolloutPool

log = logging.getLogger(__name__)

__all__ = ["UpdateGate", "update_sequence"]


@dataclass
class UpdateGate:
    """The pool's one lock for everything that loads weights, how many updates are asked for (admission stays
    paused while any is), and the engines the update under way sent ``/pause`` (their clients: the pool
    resumes them on close too, before it closes its clients)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0
    paused: dict[str, EngineClient] = field(default_factory=dict)

    async def quiesce(self, timeout_s: float) -> None:
        """At close, before the pool closes its clients: let the update under way finish (bounded), so its own
        compensation runs while the engines can still be reached; then resume whatever it left paused."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async with self.lock:
                    pass
        await self.resume_paused(timeout_s)

    async def resume_paused(self, timeout_s: float | None) -> list[str]:
        """``/resume`` every engine sent ``/pause`` — also those whose ``/pause`` failed: a pause that timed out
        may have landed, and vLLM's resume of an engine that is not paused does nothing (``resume_scheduler``
        in ``vllm/v1/engine/core.py``). Returns the engines that could not resume."""
        clients, self.paused = list(self.paused.values()), {}
        errors = await asyncio.gather(*(_resume_one(c, timeout_s) for c in clients))
        for client, error in zip(clients, errors):
            if error is None:
                log.info("%s: paused -> running (resumed)", client.name)
            else:
                log.error("%s: paused -> paused (resume failed: %s)", client.name, error)
        return [c.name for c, error in zip(clients, errors) if error is not None]


async def _resume_one(client: EngineClient, timeout_s: float | None) -> str | None:
    admin = getattr(client, "admin", None)
    if admin is None:
        return None  # no control endpoint: it was never paused
    try:
        await admin("/resume", None, timeout_s=timeout_s)
    except CallError as exc:
        return str(exc)
    return None


class _Update:
    """One update's steps, and what each did so far (so a failure undoes exactly that)."""

    def __init__(self, pool: RolloutPool, d: Dispatcher, mode: UpdateMode, max_staleness: int | None):
        self.pool, self.d, self.mode, self.max_staleness = pool, d, mode, max_staleness
        self.gate: UpdateGate = pool._updates  # its ``paused``: what close resumes if this update cannot
        self.sent: dict[str, EngineClient] = {}  # engines this update sent /pause: resumed whatever happens
        self.frozen = False  # keep: their calls wait inside the engines
        self.targets: list[str] = []  # engines the load was pointed at: unknown weights if it fails

    def _index(self, name: str) -> int:
        return [c.name for c in self.d.clients].index(name)  # the dispatcher's: the pool's go at close

    async def freeze(self) -> None:
        """How in-flight work crosses the update (:mod:`rollout_plugin.pool.weights.sources`)."""
        d, mode = self.d, self.mode
        if mode is UpdateMode.restart:
            d.abort_inflight()
        elif mode is UpdateMode.continue_:
            if await self._pause("abort"):
                d.cut_inflight(Cut.CONTINUE)  # an engine could not abort: cut our calls (streamed tokens stay)
            elif not await d.wait_idle(timeout_s=ABORT_GRACE_S):
                # A call admitted just before the pause reached its engine after it: a paused vLLM queues it
                # until /resume, which comes only after this wait. It has no tokens yet: cut it, resend it.
                d.cut_inflight(Cut.CONTINUE)
        elif mode is UpdateMode.keep:
            refused = await self._pause("keep")
            if refused:
                raise EngineError(f"{', '.join(refused)}: could not pause mode=keep; weight_update(mode='keep') "
                                  f"needs every engine in vLLM dev mode (/pause?mode=keep): set "
                                  f"engine.dev_mode=true, or use mode='drain'")
            self.frozen = True
        if mode is not UpdateMode.keep:
            await d.wait_idle()

    async def _pause(self, how: str) -> list[str]:
        names = self.d.live_engines()
        # Recorded before the fan-out: a cancel during it still resumes them.
        self.sent = {c.name: c for c in self.d.clients if c.name in names}
        self.gate.paused.update(self.sent)
        return await engine_pause(self.pool, how, names)

    def begin_load(self) -> list[str]:
        """The engines to load: those in rotation (stale ones are refit after, from the new source or, under
        pushed weights, by ``RolloutPool.rejoin_after_push``)."""
        self.targets = self.d.live_engines()
        return list(self.targets)

    async def verify_and_adopt(self, version: int) -> None:
        """Tag the loaded engines with ``version``, read it back, compare checksums; then adopt (no await after
        the check: the adoption is atomic for the dispatcher)."""
        verify = self.pool.pool_cfg.verify_weights
        reported: dict[str, int | None] = {}
        if verify != WeightVerify.off and self.targets:
            reported = await check_identity(self.pool, version, self.targets,
                                            checksum=verify == WeightVerify.checksum)
        d = self.d
        if self.frozen:
            d.mark_inflight(version)  # the calls frozen across the update: their tokens from here are new
        for name in self.targets:
            if reported.get(name) is not None:  # engine-reported; engines that cannot say follow the pool
                d.set_engine_version(self._index(name), reported[name])
        d.adopt_version(version, loaded=tuple(self._index(n) for n in self.targets if reported.get(n) is None))
        self.targets = []  # adopted: nothing left to undo

    async def bound_staleness(self) -> None:
        """No result may carry tokens older than ``version - max_staleness``: cut what runs with them, wait for
        the cut calls to settle (their units queue again), then restart every continued sample that holds them."""
        if self.max_staleness is None:
            return
        oldest = self.d.weight_version - self.max_staleness
        tasks = self.d.cut_stale(oldest)
        if tasks:
            await asyncio.wait(tasks, timeout=self.pool.pool_cfg.timeouts.request_s)
        self.d.drop_stale(oldest)

    async def undo_load(self, old: int, error: BaseException, source: WeightSource | None) -> None:
        """The load or its check failed: the engines it was pointed at leave rotation, lose the new version's tag,
        and are refit from the pool's last source where it holds one that is not where ``source`` just wrote
        (a folder written in place each step holds the failed weights now, not the old ones)."""
        if not self.targets or self.d.failure is not None or self.d._closing:  # closed meanwhile: nothing to serve
            return
        d, names, reason = self.d, self.targets, f"{type(error).__name__}: {error}"
        self.targets = []
        for name in names:
            d.load_failed(self._index(name), reason)
        # Best effort: an engine tagged with the new version by the check does not keep that tag.
        await self.pool.engine_rpc("/update_weight_version", {"new_version": str(old)}, engines=names)
        stale = [n for n in names if n in d.stale_engines()]
        last = self.pool._weight_source
        if not stale or last is None or getattr(last, "pushed", False) or (
                source is not None and source.description == last.description):
            return
        try:
            await self.pool._refit_locked(stale)
        except Exception as exc:  # they stay stale; the hopeless clock bounds every wait
            log.error("%s: restoring weight version %d failed: %s: %s", ", ".join(stale), old,
                      type(exc).__name__, exc)

    async def release(self) -> None:
        """Engines sent /pause resume, whatever happened (again if close resumed them already: a /pause still on
        its way then may have landed after that resume)."""
        self.gate.paused.update(self.sent)
        self.sent = {}
        await self.gate.resume_paused(self.pool.pool_cfg.timeouts.health_s * 6)


async def _refit_stale(pool: RolloutPool, d: Dispatcher) -> None:
    """Engines that came back since the last update are refit from the new source (a failure leaves them stale
    and fails no update: the hopeless clock bounds the wait for them)."""
    stale = d.stale_engines()
    if stale:
        try:
            await pool._refit_locked(stale)
        except Exception as exc:
            log.error("%s: refit after the update failed: %s: %s", ", ".join(stale), type(exc).__name__, exc)


@contextlib.asynccontextmanager
async def update_sequence(pool: RolloutPool, version: int | None, mode: UpdateMode, *,
                          source: WeightSource | None = None,
                          max_staleness: int | None = None) -> AsyncIterator[list[str]]:
    """``async with update_sequence(pool, version, mode) as engines:`` load the weights into ``engines`` inside.
    On a clean exit they are verified and adopted as ``version`` (default: the next) — and ``source``, what was
    loaded, becomes the pool's weight source: stale engines are refit from it before the lock is let go. On any
    failure (a refused pause, the load, the check, a cancel) the steps taken so far are undone and the error
    goes on."""
    d = pool._require()
    gate: UpdateGate = pool._updates
    gate.pending += 1
    d.pause()
    try:
        async with gate.lock:
            if d.failure is not None or d._closing:  # it waited for another update and the pool ended meanwhile
                raise PoolError("the pool closed before this weight update began")
            old = d.weight_version
            new = version if version is not None else old + 1
            step = _Update(pool, d, mode, max_staleness)
            log.info("pool: weight update %d -> %d (mode=%s)", old, new, mode.value)
            try:
                await step.freeze()
                yield step.begin_load()
                await step.verify_and_adopt(new)
                await step.bound_staleness()
                if source is not None:
                    pool._weight_source = source
                elif not getattr(pool._weight_source, "pushed", False):
                    # Loaded by a body the pool cannot replay: its last source holds older weights now, and a
                    # refit from it would tag them with this version.
                    pool._weight_source = None
            except BaseException as exc:
                log.error("pool: weight update %d -> %d failed (%s: %s); weight version %d stays", old, new,
                          type(exc).__name__, exc, old)
                await step.undo_load(old, exc, source)
                raise
            finally:
                await step.release()
            if source is not None:
                await _refit_stale(pool, d)
    finally:
        gate.pending -= 1
        if gate.pending == 0:
            d.resume()
