"""How a call ends: samples, a verdict, or a cut — and what becomes of its units (the dispatcher's other half).

Samples resolve their tickets; a sample cut short (an engine died mid-call, the weights changed under
``continue``) continues from its tokens so far (:mod:`rollout_plugin.pool.core.continuation`); a verdict
(:mod:`rollout_plugin.pool.core.engine_client`) decides between resending alone, backing off, retrying
elsewhere and an error record. Policy sees verdicts only, never HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.core.continuation import ABORTED, join_prefix, partial_sample, plan, segments
from rollout_plugin.pool.core.engine_client import CallError, Generation, RateLimited, Rejected, check_reply
from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.ledger import Call, Ledger, Unit
from rollout_plugin.pool.dispatch.resolver import PoolState, Resolver
from rollout_plugin.pool.dispatch.supervisor import Supervisor
from rollout_plugin.pool.observe.metrics import PoolMetrics
from rollout_plugin.pool.policy.ratelimit import backoff_delay
from rollout_plugin.pool.transport.health import looks_healthy
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.types import Request, Result, Sample
from rollout_plugin.types import oldest_version as _oldest

log = logging.getLogger(__name__)

__all__ = ["Health", "Outcomes"]

CLOSED = "the pool closed before this request finished"


class Health(Protocol):
    """What outcomes tells the engines' lifecycle (:class:`~rollout_plugin.pool.dispatch.membership.Membership`)."""

    def mark_suspect(self, index: int, reason: str) -> bool: ...

    def clear_suspect(self, index: int, reason: str) -> None: ...

    def mark_dead(self, index: int, reason: str) -> None: ...


class Outcomes:
    """Runs calls (:meth:`start`) and decides what each one's end means for its units: resolved through
    ``resolver``, continued from their tokens, retried (now, or after a back-off), or ended as error records."""

    def __init__(self, ledger: Ledger, engines: Sequence[EngineSlot], affinity: Affinity, *, pool: PoolState,
                 resolver: Resolver, health: Health, supervisor: Supervisor, clock: Callable[[], float],
                 wake: asyncio.Event, max_retries: int, backoff: tuple[float, float] = (0.5, 30.0),
                 rand: Callable[[], float] = random.random, metrics: PoolMetrics | None = None):
        self._ledger, self._engines, self._affinity = ledger, engines, affinity
        self._pool, self._resolver, self._health, self._supervisor = pool, resolver, health, supervisor
        self._clock, self._wake = clock, wake
        self.max_retries = max_retries
        self._backoff = backoff
        self._rand = rand
        self.metrics = metrics
        self.continued = 0  # samples continued from their tokens so far instead of generated again

    def start(self, call: Call) -> None:
        """Run ``call`` as a task; its end is settled when the task is done, even if it never starts."""
        name = self._engines[call.engine].client.name
        call.task = asyncio.get_running_loop().create_task(self._call(call), name=f"{name}-call")
        call.task.add_done_callback(functools.partial(self._call_done, call))

    async def _call(self, call: Call) -> list:
        """One engine call. Bookkeeping lives in :meth:`_call_done`, which runs even if this never starts."""
        e = self._engines[call.engine]
        requests = [u.request for u in call.units]
        reserved = sum(r.n * r.sampling.max_tokens for r in requests)
        if e.limiter is not None:
            delay = e.limiter.reserve(self._clock(), 1, reserved)
            while delay > 0:  # the provider's rate limit, not a synchronisation
                await asyncio.sleep(delay)
                delay = e.limiter.hold(self._clock())
        try:
            kwargs: dict = {}
            if call.progress is not None:  # tokens so far survive a cut
                kwargs["progress"] = call.progress
            if getattr(e.client, "salts_prefix_cache", False):  # no KV computed under other weights is reused
                kwargs["weight_version"] = call.version
            if getattr(e.client, "aborts_calls", False):  # a move can end it engine-side, tokens kept
                kwargs["call_id"] = call.id
            generations = await e.client.generate(requests, **kwargs)
            check_reply(e.client.name, requests, generations)
        except CallError as exc:
            if e.limiter is not None:
                e.limiter.settle(self._clock(), reserved, 0)
                if isinstance(exc, RateLimited):
                    e.limiter.penalize(self._clock(), exc.retry_after_s)
            raise
        if e.limiter is not None:
            e.limiter.settle(self._clock(), reserved, sum(g.prompt_tokens + g.output_tokens for g in generations))
        return generations

    def _call_done(self, call: Call, task: asyncio.Task) -> None:
        try:
            self._settle(call, task)
        except Exception as exc:  # a bug here would leave ids unresolved for ever: fail loudly instead
            log.exception("dispatcher: bookkeeping of a call failed")
            self._pool.fail(PoolError(f"the dispatcher failed: {type(exc).__name__}: {exc}"))

    def _settle(self, call: Call, task: asyncio.Task) -> None:
        now = self._clock()
        e = self._engines[call.engine]
        before = self._ledger.engine_samples[call.engine]
        self._ledger.end_call(call)
        e.account(before, self._ledger.engine_samples[call.engine], now)
        for u in call.units:
            if u.request.affinity is not None:
                self._affinity.left(u.request.affinity, call.engine, u.n)
        self._wake.set()
        if task.cancelled():
            self._after_cancel(call)
            return
        exc = task.exception()
        if exc is None:
            self._deliver(call, task.result(), now - call.started)
        elif isinstance(exc, CallError):
            self._on_failure(call, exc)
        else:  # a bug in a client: data for these requests, not a dead pool
            log.error("%s: call failed unexpectedly: %s: %s", e.client.name, type(exc).__name__, exc, exc_info=exc)
            self._fail_call(call, f"{type(exc).__name__}: {exc}")

    def _deliver(self, call: Call, generations: list[Generation], latency: float) -> None:
        e = self._engines[call.engine]
        e.delivered(generations)
        if self.metrics is not None:
            series = self.metrics.series(e.client.name)
            series.latency.observe(latency)
            series.output_tokens.inc(sum(g.output_tokens for g in generations))
        for i, (unit, gen) in enumerate(zip(call.units, generations)):
            if unit.done:
                continue
            samples = [join_prefix(unit.prefix, s, segments(call.version, call.marks, i, j, s.output_tokens))
                       for j, s in enumerate(gen.samples)]
            if any(s.finish_reason == ABORTED for s in samples):  # cut engine-side (weights changing)
                prompt = unit.prefix.prompt_ids if unit.prefix else gen.prompt_ids or _prompt_ids(unit.request, [])
                self._continue(unit, samples, prompt)
                continue
            self._resolver.finish(unit, Result(
                id=unit.request.id, samples=tuple(samples), prompt_tokens=gen.prompt_tokens, engine=e.client.name,
                latency_s=latency, attempts=unit.attempts, request=unit.ticket.request,
                weight_version=_oldest(samples, call.version)))

    def _after_cancel(self, call: Call) -> None:
        """A cancelled call's units: requeued under the same ids when the cancel was ours (engine dead,
        weights changing) — continued from the tokens they had when the client streamed them; already
        resolved when the pool closed or failed, or the caller left."""
        units = [u for u in call.units if not u.done]
        if self._pool.closing or self._pool.failure is not None:  # close()/fail() resolved them; nothing may stay open
            for u in units:
                if self._pool.failure is not None:
                    self._resolver.resolve(u.ticket, error=self._pool.failure)
                else:
                    self._resolver.finish(u, Result(id=u.request.id, error=CLOSED, attempts=u.attempts,
                                                    request=u.ticket.request))
            return
        cut = call.cancel_reason  # None: cancelled by no one of ours; its units are simply sent again
        name = self._engines[call.engine].client.name
        for i, u in reversed(list(enumerate(call.units))):
            if u.done:
                continue
            if cut is not None and cut.avoids_engine:
                u.avoid = u.avoid | {call.engine}
            counted = cut is not None and cut.counts
            if counted and u.attempts > self.max_retries:  # engines keep dying under it: a fault to bound
                self._fail_unit(call, i, u, f"{name} {cut.value}: engines died under this request "
                                               f"{u.attempts} times (pool.max_retries={self.max_retries})")
                continue
            if cut is not None and cut.salvages and self._salvage(call, i, u, counted=counted):
                continue
            if not counted:
                u.attempts -= 1  # not the request's fault
            self._ledger.enqueue(u, front=True)

    def _so_far(self, call: Call, i: int, unit: Unit) -> list[Sample | None]:
        """Unit ``i``'s samples as far as they got in this call (joined to its prefix); None: nothing known."""
        samples: list[Sample | None] = []
        for j, p in enumerate(call.progress[i] if call.progress is not None else [None] * unit.n):
            got = partial_sample(p, call.version) if p is not None else Sample("")
            if got.token_ids:
                got = join_prefix(unit.prefix, got, segments(call.version, call.marks, i, j, got.output_tokens))
            samples.append(got if got.token_ids else unit.prefix.sample if unit.prefix else None)
        return samples

    def _salvage(self, call: Call, i: int, unit: Unit, *, counted: bool) -> bool:
        """Continue unit ``i`` of a cut call from what streamed in before the cut; False if nothing did."""
        if call.progress is None or not any(p.token_ids for p in call.progress[i]):
            return False
        prompt = unit.prefix.prompt_ids if unit.prefix else _prompt_ids(unit.request, call.progress[i])
        self._continue(unit, self._so_far(call, i, unit), prompt, counted=counted)
        return True

    def _continue(self, unit: Unit, samples: list[Sample | None], prompt_ids: Sequence[int] | None, *,
                  counted: bool = False) -> None:
        """Continue a cut unit's samples from the tokens they have: finished ones are kept, each unfinished
        one goes on alone (prompt + its tokens), those with nothing to continue from start again.
        ``counted``: the cut was a failure (or its engine died), and the try counts against every piece
        (they inherit the unit's attempts): attempts are bounded per sample across continuations."""
        if not counted:
            unit.attempts -= 1  # cut by a weight update (or the staleness bound): not the request's fault
        p = plan(samples, prompt_ids, unit.ticket.request.sampling.max_tokens, unit.prefix)
        if (p.trivial and p.fresh == unit.n) or (unit.prefix is not None and p.continued == [unit.prefix]):
            self._ledger.enqueue(unit, front=True)  # nothing gained since it was sent: send it again as it is
            return
        sizes = ([len(p.finished)] if p.finished else []) + [1] * len(p.continued) + ([p.fresh] if p.fresh else [])
        prefixes = ([None] if p.finished else []) + list(p.continued) + ([None] if p.fresh else [])
        pieces = self._ledger.split(unit, sizes, prefixes)
        self.continued += len(p.continued)
        if p.finished:
            done, pieces = pieces[0], pieces[1:]
            self._resolver.finish(done, Result(id=unit.request.id, samples=tuple(p.finished), attempts=unit.attempts,
                                               request=unit.ticket.request,
                                               weight_version=_oldest(p.finished, self._pool.weight_version)))
        for piece in reversed(pieces):
            self._ledger.enqueue(piece, front=True)

    def _on_failure(self, call: Call, exc: CallError) -> None:
        e = self._engines[call.engine]
        e.failed_calls += 1
        units = [u for u in call.units if not u.done]
        log.warning("%s: call of %d request(s) failed: %s", e.client.name, len(call.units), exc)
        if isinstance(exc, Rejected) and len(units) > 1:
            for u in reversed(units):  # one bad member fails a packed call: resend each alone
                u.make_solo()
                u.attempts -= 1
                self._ledger.enqueue(u, front=True)
            return
        if exc.suspect and self._health.mark_suspect(e.index, str(exc)):
            self._supervisor.spawn(f"{e.client.name}-probe", self._probe(e, str(exc)),
                                  on_error=lambda err: self._health.mark_dead(e.index, f"probe failed: {err}"))
        elsewhere = any(x.available and x.index != e.index for x in self._engines)
        for i, u in reversed(list(enumerate(call.units))):
            if u.done:
                continue
            if exc.retryable and u.attempts <= self.max_retries:
                u.avoid = u.avoid | {e.index}
                if self._salvage(call, i, u, counted=True):
                    continue  # the engine broke mid-call: its samples go on elsewhere from the tokens they had
            if not exc.retryable or u.attempts > self.max_retries:
                self._fail_unit(call, i, u, str(exc))
                continue
            u.avoid = u.avoid | {e.index}
            if isinstance(exc, RateLimited) or not elsewhere:
                # Nowhere else to go (or the server said when): back off with full jitter, capped.
                cap = self._backoff[1]
                delay = min(cap, exc.retry_after_s if exc.retry_after_s is not None else
                            backoff_delay(u.attempts - 1, self._backoff[0], cap, self._rand()))
                timer = asyncio.get_running_loop().call_later(delay, self._backoff_done, u)
                self._ledger.back_off(u, timer)
            else:
                self._ledger.enqueue(u, front=True)

    def _fail_call(self, call: Call, error: str) -> None:
        """Every unit of ``call`` still open ends as an error record."""
        name = self._engines[call.engine].client.name
        for u in call.units:
            if not u.done:
                self._resolver.finish(u, Result(id=u.request.id, engine=name, attempts=u.attempts, error=error,
                                                request=u.ticket.request))

    def _fail_unit(self, call: Call, i: int, unit: Unit, error: str) -> None:
        """Unit ``i`` ends as an error record; the tokens its samples got so far stay in it (``partial``)."""
        partial = tuple(s for s in self._so_far(call, i, unit) if s is not None)
        self._resolver.finish(unit, Result(id=unit.request.id, engine=self._engines[call.engine].client.name,
                                           attempts=unit.attempts, error=error, request=unit.ticket.request,
                                           partial=partial))

    def _backoff_done(self, unit: Unit) -> None:
        self._ledger.end_back_off(unit)
        if not unit.done:
            self._ledger.enqueue(unit, front=True)
            self._wake.set()

    async def _probe(self, e: EngineSlot, reason: str) -> None:
        if await looks_healthy(e.client):
            self._health.clear_suspect(e.index, "health check passed")
        else:
            self._health.mark_dead(e.index, reason)


def _prompt_ids(request: Request, parts: Sequence) -> tuple[int, ...] | None:
    """The prompt's token ids: a token prompt is its own; otherwise what the engine streamed back, if it did."""
    if request.kind == "tokens":
        return tuple(request.prompt)  # type: ignore[arg-type]
    ids = next((p.prompt_token_ids for p in parts if p.prompt_token_ids), None)
    return tuple(ids) if ids else None

