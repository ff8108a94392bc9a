"""The pool's public operations beside generation: pause, resume, weight updates, step quotas, control calls.

The gateway and the trainer adapters call these, never the dispatcher: one sequence, serialized, loads
weights and undoes what it did when a step fails (:mod:`rollout_plugin.pool.weights.update`; how in-flight work
crosses it: :mod:`rollout_plugin.pool.weights.sources`), and one fan-out (:meth:`engine_rpc`)
reaches every engine with one error behaviour: an answer per engine, never an exception for one engine
(callers that need every engine to succeed check the answers with
:func:`~rollout_plugin.pool.transport.rpc.require_ok`).

:class:`Operations` is a part :class:`~rollout_plugin.pool.api.pool.RolloutPool` composes (the pool's public
methods of the same names forward to it), handed what it uses: the dispatcher and the engine clients (getters: the
first exists once the pool runs, restarts replace the second), the update gate, the pool's weight source (a
getter: each update replaces it) and config, and the pool itself, only to hand on to the update sequence and the
step quotas. A weight source is handed less: :class:`EngineFanout`, the engines' names and the fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout_plugin.config.schema import PoolConfig, WeightVerify
from rollout_plugin.errors import PoolError
from rollout_plugin.pool.api.steps import Steps
from rollout_plugin.pool.core.engine_client import EngineClient
from rollout_plugin.pool.core.lifecycle import Refit
from rollout_plugin.pool.dispatch.dispatcher import Dispatcher
from rollout_plugin.pool.transport.rpc import RpcAnswer, rpc_one
from rollout_plugin.pool.weights.sources import EngineControl, UpdateMode, WeightSource, check_identity
from rollout_plugin.pool.weights.update import UpdateGate, update_sequence
from rollout_plugin.types import Request

if TYPE_CHECKING:
    from rollout_plugin.pool.api.pool import RolloutPool

log = logging.getLogger(__name__)

__all__ = ["EngineFanout", "Operations", "PushedWeights"]


@dataclass(frozen=True)
class PushedWeights:
    """A weight source the trainer pushes into every engine at each sync (:meth:`RolloutPool.expect_weight_pushes`):
    nothing to load on demand; a refit after a sync only checks what the sync loaded."""

    description: str
    pushed: bool = True

    async def load(self, control: EngineControl, engines: Sequence[str]) -> None:
        return None  # the sync already loaded every engine


class EngineFanout:
    """One control call to many engines at once, over the pool's current clients (a weight source's
    :class:`~rollout_plugin.pool.weights.sources.EngineControl`)."""

    def __init__(self, clients: Callable[[], Sequence[EngineClient]]):
        self._clients = clients

    @property
    def engine_names(self) -> list[str]:
        return [c.name for c in self._clients()]

    async def engine_rpc(self, path: str, body: dict | None = None, *, timeout_s: float | None = None,
                         method: str = "POST", engines: Sequence[str] | None = None) -> list[RpcAnswer]:
        clients = [c for c in self._clients() if engines is None or c.name in engines]
        return list(await asyncio.gather(*(rpc_one(c, path, body, timeout_s, method) for c in clients)))


class Operations:
    """The pool's operations beside generation (see the module's docstring for what it is handed)."""

    def __init__(self, pool: RolloutPool, *, dispatcher: Callable[[], Dispatcher],
                 clients: Callable[[], Sequence[EngineClient]], gate: UpdateGate,
                 source: Callable[[], WeightSource | None], pool_cfg: PoolConfig):
        self._pool, self._require, self._updates, self._source = pool, dispatcher, gate, source
        self.pool_cfg = pool_cfg
        self.fanout = EngineFanout(clients)

    async def pause(self, *, drain: bool = True) -> None:
        """Stop admitting new calls (queued work waits); with ``drain``, wait until nothing is in flight."""
        d = self._require()
        d.pause()
        if drain:
            await d.wait_idle()

    def resume(self, version: int | None = None) -> None:
        """Admit again; ``version``: the weights every later result is tagged with. Not while a weight update
        is under way: it resumes admission itself when it ends (raises :class:`PoolError`)."""
        d = self._require()
        if self._updates.pending:
            raise PoolError("pool.resume(): a weight update is under way; it resumes admission when it ends")
        d.resume(version)

    @property
    def paused(self) -> bool:
        return self._require().paused

    @contextlib.asynccontextmanager
    async def weight_update(self, version: int | None = None, *, mode: UpdateMode | str = UpdateMode.drain,
                            abort: bool = False, max_staleness: int | None = None) -> AsyncIterator[None]:
        """``async with pool.weight_update(version, mode=...):`` load the weights into the engines inside;
        every result after it carries ``version`` (default: the next). ``mode`` (see
        :mod:`rollout_plugin.pool.weights.sources`): ``drain`` waits for in-flight samples, ``keep`` freezes them in
        the engines and resumes them under the new weights, ``continue`` aborts them engine-side and
        continues each from its tokens so far, ``restart`` (``abort=True``) generates them again.
        ``max_staleness``: no result carries tokens more than this many versions older than ``version``; older
        work starts over. One update at a time (:mod:`rollout_plugin.pool.weights.update`): if the body or any step
        raises, engines that paused resume, engines the body may have loaded leave rotation until refit, and
        the old version stays."""
        mode = UpdateMode("restart" if abort else getattr(mode, "value", mode))
        async with update_sequence(self._pool, version, mode, max_staleness=max_staleness):
            yield

    def steps(self, source: Iterable[Request] | AsyncIterable[Request], *, in_flight: int | None = None,
              max_staleness: int | None = None) -> Steps:
        """``async with pool.steps(requests) as steps: groups = await steps.next(N)`` — step quota with
        carry-over: M > N groups in flight (unset: relative to N), each step takes the first N to finish, the
        rest run on; groups more than ``max_staleness`` versions old are not handed out
        (:mod:`rollout_plugin.pool.api.steps`)."""
        self._require()
        return Steps(self._pool, source, in_flight, max_staleness=max_staleness)

    async def update_weights(self, version: int | None, source: WeightSource, *,
                             mode: UpdateMode | str = UpdateMode.drain, max_staleness: int | None = None) -> int:
        """Load ``source`` into every engine in rotation, in the pool's one update sequence
        (:mod:`rollout_plugin.pool.weights.update`); the pool remembers it, so an engine that restarts or joins later is
        refit from it before it rejoins. Returns the new version; on a failure the old one stays."""
        mode = UpdateMode(getattr(mode, "value", mode))
        async with update_sequence(self._pool, version, mode, source=source, max_staleness=max_staleness) as engines:
            await source.load(self.fanout, engines)
        return self.weight_version

    def live_engines(self) -> list[str]:
        """Engines in rotation (not dead, stale or retired)."""
        return self._require().live_engines()

    @property
    def weight_version(self) -> int:
        return self._require().weight_version

    async def engine_rpc(self, path: str, body: dict | None = None, *, timeout_s: float | None = None,
                         method: str = "POST", engines: Sequence[str] | None = None) -> list[RpcAnswer]:
        """``method path`` on the engines' control endpoints (vLLM's ``/collective_rpc``, ``/reset_prefix_cache``,
        ``/pause`` …), every engine (or the named ``engines``) at once. Never raises for an engine's failure:
        each answer says how its engine did; ``require_ok(answers)`` (``rollout_plugin.pool``) raises naming
        each engine that failed."""
        self._require()
        return await self.fanout.engine_rpc(path, body, timeout_s=timeout_s, method=method, engines=engines)

    def refit_kind(self) -> tuple[Refit, str | None]:
        """How a stale engine gets the pool's weights: from the source the pool holds, at the trainer's next
        push (a source marked ``pushed``: TRL's NCCL transport), or not at all."""
        source = self._source()
        if source is None:
            return Refit.none, None
        return (Refit.pushed if getattr(source, "pushed", False) else Refit.held), source.description

    def stale_engines(self) -> list[str]:
        """Engines out of rotation until refit (they restarted or joined after the weights changed)."""
        return self._require().stale_engines()

    async def rejoin_after_push(self) -> list[str]:
        """After a sync that loaded the current weights into every engine (stale ones too): each stale engine is
        checked (version, checksums) and rejoins. Returns their names. Raises as the check does (they stay out)."""
        stale = self._require().stale_engines()
        if stale and self.refit_kind()[0] is Refit.pushed:
            await self.refit(stale)
        return stale

    async def refit_stale(self, names: list[str], *, reraise: bool = False) -> None:
        """Refit engines that (re)joined with other weights, as the pool's weight source allows. A failed
        refit leaves them stale (the dispatcher's hopeless clock then bounds every wait); it fails a restart
        only in the log, an attach (``reraise``) in its caller."""
        refit, source = self.refit_kind()
        if refit is Refit.pushed:
            log.warning("%s: stale until the next weight sync (%s)", ", ".join(names), source)
            return
        try:
            await self.refit(names)
        except Exception as exc:  # the engine stays stale and the wait is bounded: see fail_if_hopeless
            log.error("%s: refit failed: %s: %s", ", ".join(names), type(exc).__name__, exc)
            if reraise:
                raise

    async def refit(self, names: list[str]) -> None:
        """Load the pool's last weight source into stale engines, check them, and put them back in rotation;
        without a source they stay out (and the log says how to fix that). Never while an update loads: it
        waits for the pool's update lock, then loads the weights of that moment."""
        async with self._updates.lock:
            await self.refit_locked(names)

    async def refit_locked(self, names: list[str]) -> None:
        """:meth:`refit`, the update lock held (the update sequence refits inside it)."""
        d = self._require()
        names = [n for n in names if n in d.stale_engines()]  # an update meanwhile may have refit them
        if not names:
            return
        source = self._source()
        if source is None:
            log.error("%s: stays stale (the pool has no weight source to refit it from: weights were loaded "
                      "inside weight_update(); use pool.update_weights(version, source) so restarted engines "
                      "can be refit; callers get PoolError after pool.timeouts.hopeless_s)", ", ".join(names))
            return
        for name in names:  # stale -> refitting (the engine state machine, pool/core/lifecycle.py)
            d.refitting(self.fanout.engine_names.index(name), source.description)
        try:
            await source.load(self.fanout, names)
            reported = await check_identity(self._pool, d.weight_version, names,
                                            checksum=self.pool_cfg.verify_weights == WeightVerify.checksum)
        except Exception as exc:  # refitting -> stale; the hopeless clock bounds the callers' wait
            for name in names:
                d.refit_failed(self.fanout.engine_names.index(name), f"{type(exc).__name__}: {exc}")
            raise
        for name in names:
            d.rejoin(self.fanout.engine_names.index(name), reported.get(name))

