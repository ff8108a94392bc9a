"""The pool's public operations beside generation: pause, resume, weight updates, step quotas, control calls.

The gateway and the trainer adapters call these, never the dispatcher: one place decides how a weight
update crosses in-flight work (:mod:`rollout_plugin.pool.weights`), and one fan-out (:meth:`control`)
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
from rollout_plugin.errors import EngineError
from rollout_plugin.pool.engine_client import CallError, EngineClient
from rollout_plugin.pool.steps import Steps
from rollout_plugin.pool.weights import (
    ABORT_GRACE_S,
    UpdateMode,
    WeightSource,
    check_identity,
    engine_pause,
    engine_resume,
)
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
        """Admit again; ``version``: the weights every later result is tagged with."""
        self._require().resume(version)

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
        ``max_staleness``: a sample may span at most this many versions; older work starts over."""
        d = self._require()
        mode = UpdateMode("restart" if abort else getattr(mode, "value", mode))
        d.pause()
        new = version if version is not None else d.weight_version + 1
        frozen = loaded = False
        try:
            if mode is UpdateMode.restart:
                d.abort_inflight()
            elif mode is UpdateMode.continue_:
                if await engine_pause(self, "abort"):
                    d.cut_inflight("continue")  # an engine could not abort: cut our calls (streamed tokens stay)
                elif not await d.wait_idle(timeout_s=ABORT_GRACE_S):
                    # A call admitted just before the pause reached its engine after it: a paused vLLM queues it
                    # until /resume, which comes only after this wait. It has no tokens yet: cut it, resend it.
                    d.cut_inflight("continue")
            elif mode is UpdateMode.keep:
                if await engine_pause(self, "keep"):
                    raise EngineError("weight_update(mode='keep') needs every engine in vLLM dev mode "
                                      "(/pause?mode=keep): set engine.dev_mode=true, or use mode='drain'")
                frozen = True
            if mode is not UpdateMode.keep:
                await d.wait_idle()
            yield
            loaded = True
            if frozen:
                d.mark_inflight(new)  # the calls frozen across the update: their tokens from here are new
            await self._adopt(new)
        finally:
            if frozen or mode is UpdateMode.continue_:
                await engine_resume(self)
            # A failed load keeps the old version: nothing may be tagged with weights that did not arrive.
            d.resume(new if loaded else None, max_staleness=max_staleness if loaded else None)

    def steps(self, source: Iterable[Request] | AsyncIterable[Request], *, in_flight: int) -> Steps:
        """``async with pool.steps(requests, in_flight=M) as steps: groups = await steps.next(N)`` — step quota
        with carry-over: M > N groups in flight, each step takes the first N to finish, the rest run on
        (:mod:`rollout_plugin.pool.steps`)."""
        self._require()
        return Steps(self, source, in_flight)

    async def update_weights(self, version: int | None, source: WeightSource, *,
                             mode: UpdateMode | str = UpdateMode.drain, max_staleness: int | None = None) -> int:
        """Load ``source`` into every engine under :meth:`weight_update`; the pool remembers it, so an engine
        that restarts or joins later is refit from it before it rejoins. Returns the new version."""
        async with self.weight_update(version, mode=mode, max_staleness=max_staleness):
            await source.load(self, self._require().live_engines())
            self._weight_source = source
        stale = self._require().stale_engines()
        if stale:  # engines that came back since the last update: refit them from this source too
            await self._refit(stale)
        return self.weight_version

    async def _adopt(self, version: int) -> None:
        """Tag every engine with ``version`` and check they agree (engine-reported, checksums)."""
        if self.pool_cfg.verify_weights == WeightVerify.off:
            return
        names = self._require().live_engines()
        reported = await check_identity(self, version, names,
                                        checksum=self.pool_cfg.verify_weights == WeightVerify.checksum)
        for name, got in reported.items():
            if got is not None:  # engine-reported; engines that cannot say follow the pool's version
                self._require().set_engine_version(self.engine_names.index(name), got)

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
        without a source they stay out (and the log says how to fix that)."""
        d = self._require()
        if self._weight_source is None:
            log.error("%s: stale -> stale (the pool has no weight source to refit it from: weights were loaded "
                      "inside weight_update(); use pool.update_weights(version, source) so restarted engines "
                      "can be refit)", ", ".join(names))
            return
        log.info("%s: stale -> refitting (%s, weight version %d)", ", ".join(names),
                 self._weight_source.description, d.weight_version)
        await self._weight_source.load(self, names)
        reported = await check_identity(self, d.weight_version, names,
                                        checksum=self.pool_cfg.verify_weights == WeightVerify.checksum)
        for name in names:
            d.rejoin(self.engine_names.index(name), reported.get(name))

