"""The pool's public operations beside generation: pause, resume, weight updates, step quotas, control calls.

The gateway and the trainer adapters call these, never the dispatcher: one sequence, serialized, loads
weights and undoes what it did when a step fails (:mod:`rollout_plugin.pool.update`; how in-flight work
crosses it: :mod:`rollout_plugin.pool.weights`), and one fan-out (:meth:`control`)
reaches every engine with one error behaviour: an answer per engine, never an exception for one engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rollout_plugin.config.schema import WeightVerify
from rollout_plugin.errors import EngineError, PoolError
from rollout_plugin.pool.engine_client import CallError, EngineClient
from rollout_plugin.pool.steps import Steps
from rollout_plugin.pool.update import update_sequence
from rollout_plugin.pool.weights import UpdateMode, WeightSource, check_identity
from rollout_plugin.types import Request

log = logging.getLogger("rollout_plugin.pool.pool")

__all__ = ["ControlAnswer", "Operations"]


@dataclass(frozen=True)
class ControlAnswer:
    """One engine's answer to a control call: HTTP-ish ``status`` (502: no answer), its JSON ``body``, or ``error``."""

    engine: str
    status: int
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


async def _control_one(client: EngineClient, path: str, body: dict | None, timeout_s: float | None,
                       method: str = "POST") -> ControlAnswer:
    admin = getattr(client, "admin", None)
    if admin is None:
        return ControlAnswer(client.name, 501, error=f"{client.name}: {method} {path}: this engine client has no "
                                                     f"control endpoint (only HTTP engines do)")
    try:
        kwargs = {"timeout_s": timeout_s} if method == "POST" else {"timeout_s": timeout_s, "method": method}
        return ControlAnswer(client.name, 200, await admin(path, body, **kwargs))
    except CallError as exc:
        return ControlAnswer(client.name, exc.status or 502, error=str(exc))



class Operations:
    """Mixed into :class:`~rollout_plugin.pool.pool.RolloutPool` (its state lives there)."""

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
        :mod:`rollout_plugin.pool.weights`): ``drain`` waits for in-flight samples, ``keep`` freezes them in
        the engines and resumes them under the new weights, ``continue`` aborts them engine-side and
        continues each from its tokens so far, ``restart`` (``abort=True``) generates them again.
        ``max_staleness``: no result carries tokens more than this many versions older than ``version``; older
        work starts over. One update at a time (:mod:`rollout_plugin.pool.update`): if the body or any step
        raises, engines that paused resume, engines the body may have loaded leave rotation until refit, and
        the old version stays."""
        mode = UpdateMode("restart" if abort else getattr(mode, "value", mode))
        async with update_sequence(self, version, mode, max_staleness=max_staleness):
            yield

    def steps(self, source: Iterable[Request] | AsyncIterable[Request], *, in_flight: int | None = None,
              max_staleness: int | None = None) -> Steps:
        """``async with pool.steps(requests) as steps: groups = await steps.next(N)`` — step quota with
        carry-over: M > N groups in flight (unset: relative to N), each step takes the first N to finish, the
        rest run on; groups more than ``max_staleness`` versions old are not handed out
        (:mod:`rollout_plugin.pool.steps`)."""
        self._require()
        return Steps(self, source, in_flight, max_staleness=max_staleness)

    async def update_weights(self, version: int | None, source: WeightSource, *,
                             mode: UpdateMode | str = UpdateMode.drain, max_staleness: int | None = None) -> int:
        """Load ``source`` into every engine in rotation, in the pool's one update sequence
        (:mod:`rollout_plugin.pool.update`); the pool remembers it, so an engine that restarts or joins later is
        refit from it before it rejoins. Returns the new version; on a failure the old one stays."""
        mode = UpdateMode(getattr(mode, "value", mode))
        async with update_sequence(self, version, mode, source=source, max_staleness=max_staleness) as engines:
            await source.load(self, engines)
        return self.weight_version

    def live_engines(self) -> list[str]:
        """Engines in rotation (not dead, stale or retired)."""
        return self._require().live_engines()

    @property
    def weight_version(self) -> int:
        return self._require().weight_version

    async def control(self, path: str, body: dict | None = None, *, timeout_s: float | None = None,
                      method: str = "POST", engines: Sequence[str] | None = None) -> list[ControlAnswer]:
        """A control call (vLLM's ``/collective_rpc``, ``/reset_prefix_cache``, ``/pause`` …) to every engine
        (or the named ``engines``) at once. Never raises for an engine's failure: each answer says how its
        engine did."""
        self._require()
        clients = [c for c in self._clients if engines is None or c.name in engines]
        return list(await asyncio.gather(*(_control_one(c, path, body, timeout_s, method) for c in clients)))

    async def call_engines(self, path: str, body: dict | None = None, *, timeout_s: float | None = None) -> list:
        """:meth:`control`, for callers that need every engine to succeed: the answers' bodies in engine order,
        or the first failure raised as :class:`EngineError`."""
        answers = await self.control(path, body, timeout_s=timeout_s)
        failed = [a for a in answers if not a.ok]
        if failed:
            raise EngineError(failed[0].error or f"{failed[0].engine}: POST {path}: HTTP {failed[0].status}")
        return [a.body for a in answers]

    async def _refit(self, names: list[str]) -> None:
        """Load the pool's last weight source into stale engines, check them, and put them back in rotation;
        without a source they stay out (and the log says how to fix that). Never while an update loads: it
        waits for the pool's update lock, then loads the weights of that moment."""
        async with self._updates.lock:
            await self._refit_locked(names)

    async def _refit_locked(self, names: list[str]) -> None:
        """:meth:`_refit`, the update lock held (the update sequence refits inside it)."""
        d = self._require()
        names = [n for n in names if n in d.stale_engines()]  # an update meanwhile may have refit them
        if not names:
            return
        if self._weight_source is None:
            log.error("%s: stays stale (the pool has no weight source to refit it from: weights were loaded "
                      "inside weight_update(); use pool.update_weights(version, source) so restarted engines "
                      "can be refit; callers get PoolError after pool.timeouts.hopeless_s)", ", ".join(names))
            return
        for name in names:  # stale -> refitting (the engine state machine, pool/lifecycle.py)
            d.refitting(self.engine_names.index(name), self._weight_source.description)
        try:
            await self._weight_source.load(self, names)
            reported = await check_identity(self, d.weight_version, names,
                                            checksum=self.pool_cfg.verify_weights == WeightVerify.checksum)
        except Exception as exc:  # refitting -> stale; the hopeless clock bounds the callers' wait
            for name in names:
                d.refit_failed(self.engine_names.index(name), f"{type(exc).__name__}: {exc}")
            raise
        for name in names:
            d.rejoin(self.engine_names.index(name), reported.get(name))

