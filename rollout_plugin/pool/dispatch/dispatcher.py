"""The dispatcher: the pool's policy over the :class:`~rollout_plugin.pool.core.ledger.Ledger`.

The ledger owns request state and the one resolve path; this module decides what happens next.
Transport lives behind :class:`~rollout_plugin.pool.core.engine_client.EngineClient` and reaches policy
only as verdicts (``Rejected``, ``RateLimited``, ``Unavailable``, ``TimedOut``, ``Malformed``).
Invariants (each has a test, and a randomized test holds them over thousands of schedules):

1. every submitted request id resolves exactly once: a :class:`Result` with samples or with an error,
   or :class:`PoolError` raised when the pool itself failed; the pool never cancels a caller's future;
2. a call is admitted only within its engine's cap and the global cap, both counted in samples;
3. a unit that cannot fit anywhere now does not hold up smaller ones behind it (the oldest such unit
   reserves the engine it waits for, so it is not starved either).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.core.affinity import Affinity
from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.engine_client import EngineClient
from rollout_plugin.pool.core.ledger import Call, Ledger, Ticket
from rollout_plugin.pool.core.lifecycle import Refit
from rollout_plugin.pool.core.slots import EngineSlot
from rollout_plugin.pool.dispatch.admission import Admission
from rollout_plugin.pool.dispatch.membership import Membership
from rollout_plugin.pool.dispatch.outcomes import CLOSED, Outcomes
from rollout_plugin.pool.dispatch.resolver import Resolver
from rollout_plugin.pool.dispatch.supervisor import Supervisor
from rollout_plugin.pool.dispatch.weight_sync import WeightSync
from rollout_plugin.pool.observe.metrics import PoolMetrics
from rollout_plugin.pool.observe.stats import PoolStats
from rollout_plugin.pool.policy.limits import Limits
from rollout_plugin.pool.policy.ratelimit import RateLimiter, RateLimits
from rollout_plugin.types import Request, Result

log = logging.getLogger(__name__)

__all__ = ["Dispatcher"]


def _forward(part: str, name: str) -> property:
    """``dispatcher.name`` is ``dispatcher.<part>.name``: the public surface, kept where callers expect it."""
    return property(lambda self: getattr(getattr(self, part), name),
                    doc=f":meth:`{part.title().replace('_', '')}.{name}` of the dispatcher's ``{part}``.")


class Dispatcher:
    """The pool's policy over its ledger, composed of parts that share only what each is handed: ``admission``
    (places queued units and starts their calls, :mod:`.admission`), ``outcomes`` (runs calls, decides what each
    end means, :mod:`.outcomes`), ``membership`` (engines in and out of rotation, :mod:`.membership`),
    ``weight_sync`` (what a weight update does to in-flight work, :mod:`.weight_sync`) and ``resolver`` (the one
    resolve path, :mod:`.resolver`). This class holds the run state, the loop and the public surface. Run with
    ``await dispatcher.run()`` (the pool does, as a supervised task)."""

    def __init__(self, clients: Sequence[EngineClient], limits: Limits, *, pack_size: int, max_retries: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str, object, object, str], None] | None = None,
                 rate_limits: RateLimits | None = None, backoff: tuple[float, float] = (0.5, 30.0),
                 rand: Callable[[], float] = random.random, metrics: PoolMetrics | None = None,
                 recover: Callable[[int], bool] | None = None, group_mode: str = "auto",
                 split_threshold: float = 0.25, pack_timeout_s: float = 0.0, supervisor: Supervisor | None = None,
                 can_refit: Callable[[], tuple[Refit, str | None]] | None = None, hopeless_s: float = 60.0,
                 affinity_max_keys: int = 100_000, affinity_ttl_s: float | None = None):
        if not clients:
            raise PoolError("a pool needs at least one engine")
        self.limits = limits
        self._clock = clock
        self._on_change = on_change or (lambda kind, engine, old, new, reason: None)
        self._started = clock()
        self._rate_limits = rate_limits
        self._engines = [self._slot(i, c, limits.engine_inflight) for i, c in enumerate(clients)]
        self.supervisor = supervisor or Supervisor()
        self.ledger = Ledger(len(clients))
        self.affinity = Affinity(affinity_max_keys, affinity_ttl_s)
        self._wake = asyncio.Event()
        self._closing = False
        self.failure: PoolError | None = None
        shared = (self.ledger, self._engines)
        self.resolver = Resolver(self.ledger, metrics)
        self.membership = Membership(*shared, self.affinity, pool=self, resolver=self.resolver, wake=self._wake,
                                     slot=self._slot, on_change=self._on_change, recover=recover,
                                     can_refit=can_refit, hopeless_s=hopeless_s)
        self.weight_sync = WeightSync(*shared, resolver=self.resolver, wake=self._wake,
                                      recheck=self.membership.fail_if_hopeless)
        self.outcomes = Outcomes(*shared, self.affinity, pool=self, resolver=self.resolver, health=self.membership,
                                 supervisor=self.supervisor, clock=clock, wake=self._wake, max_retries=max_retries,
                                 backoff=backoff, rand=rand, metrics=metrics)
        self.admission = Admission(*shared, self.affinity, clock=clock, wake=self._wake, start=self.outcomes.start,
                                   pack_size=pack_size, group_mode=group_mode, split_threshold=split_threshold,
                                   pack_timeout_s=pack_timeout_s)

    # -- the parts' state, read where callers expect it ------------------------------------------
    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def weight_version(self) -> int:
        return self.weight_sync.weight_version

    @property
    def paused(self) -> bool:
        return self.weight_sync.paused

    @property
    def metrics(self) -> PoolMetrics | None:
        return self.resolver.metrics

    @metrics.setter
    def metrics(self, metrics: PoolMetrics | None) -> None:
        self.resolver.metrics = self.outcomes.metrics = metrics

    @property
    def pack_size(self) -> int:
        return self.admission.pack_size

    @property
    def groups_split(self) -> int:
        return self.admission.groups_split

    @property
    def continued(self) -> int:
        return self.outcomes.continued

    # engines in and out of rotation
    mark_dead = _forward("membership", "mark_dead")
    restart = _forward("membership", "restart")
    mark_suspect = _forward("membership", "mark_suspect")
    clear_suspect = _forward("membership", "clear_suspect")
    fail_if_hopeless = _forward("membership", "fail_if_hopeless")
    refitting = _forward("membership", "refitting")
    refit_failed = _forward("membership", "refit_failed")
    rejoin = _forward("membership", "rejoin")
    stale_engines = _forward("membership", "stale_engines")
    live_engines = _forward("membership", "live_engines")
    retire = _forward("membership", "retire")
    restart_failed = _forward("membership", "restart_failed")
    set_engine_version = _forward("membership", "set_engine_version")
    load_failed = _forward("membership", "load_failed")
    # a weight update, as the dispatcher sees it (the sequence: rollout_plugin.pool.weights.update)
    pause = _forward("weight_sync", "pause")
    resume = _forward("weight_sync", "resume")
    abort_inflight = _forward("weight_sync", "abort_inflight")
    wait_idle = _forward("weight_sync", "wait_idle")
    adopt_version = _forward("weight_sync", "adopt_version")
    cut_inflight = _forward("weight_sync", "cut_inflight")
    mark_inflight = _forward("weight_sync", "mark_inflight")
    cut_stale = _forward("weight_sync", "cut_stale")
    drop_stale = _forward("weight_sync", "drop_stale")

    def replace_client(self, index: int, client: EngineClient, *, stale: bool = False) -> EngineClient:
        """A restarted engine's fresh client, with the starting cap (:meth:`Membership.replace_client`)."""
        return self.membership.replace_client(index, client, self.limits.engine_inflight, stale=stale)

    def add_client(self, client: EngineClient, limits: Limits, *, stale: bool = False) -> int:
        """A new engine joins; returns its index. ``limits`` are the pool's for the new engine count: the global
        cap grows with the pool. ``stale``: out until refit (:meth:`Membership.add_client`)."""
        self.limits = limits
        return self.membership.add_client(client, limits.engine_inflight, stale=stale)

    def _slot(self, index: int, client: EngineClient, cap: int) -> EngineSlot:
        now = self._clock()
        return EngineSlot(index, client, cap, since=now,
                          limiter=RateLimiter(self._rate_limits, now) if self._rate_limits else None)

    # -- public -----------------------------------------------------------------------------------
    @property
    def global_cap(self) -> int:
        """Samples in flight across the pool (``max_concurrent`` groups of ``k``); when derived, never below the
        sum of the engines' caps (the controller's raises count)."""
        if not self.limits.derived_global:
            return self.limits.global_samples
        return max(self.limits.global_samples, sum(e.cap for e in self._engines))

    @property
    def max_n(self) -> int:
        """The most samples one request may ask for: what one engine and the pool may ever hold."""
        return min(self.limits.engine_inflight, self.global_cap)

    def submit(self, request: Request) -> asyncio.Future[Result]:
        if self.failure is not None:
            raise self.failure
        if self._closing:
            raise PoolError("the pool is closed")
        if request.id in self.ledger.tickets:
            raise ValueError(f"request id {request.id!r} is already in flight; ids must be unique")
        if not 1 <= request.n <= self.max_n:
            raise ValueError(f"request {request.id!r} asks n={request.n} samples; one request may ask 1 to "
                             f"{self.max_n} (one engine's cap {self.limits.engine_inflight}, the pool's "
                             f"{self.global_cap}): raise pool.per_engine / pool.max_concurrent, or send fewer")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        ticket = self.ledger.open(request, future, self._clock())
        if self.admission.group_mode == "split" and request.n > 1:
            for unit in self.ledger.split(self.ledger.unit(ticket, request.n), [1] * request.n):
                self.ledger.enqueue(unit)
        else:
            self.ledger.enqueue(self.ledger.unit(ticket, request.n))
        future.add_done_callback(functools.partial(self._caller_gone, ticket))
        self._wake.set()
        return future

    def _caller_gone(self, ticket: Ticket, future: asyncio.Future[Result]) -> None:
        """The caller stopped waiting (a stream closed early): drop the request, stop its calls."""
        if future.cancelled() and not ticket.resolved:
            self.resolver.resolve(ticket, outcome="abandoned")

    def stats(self) -> PoolStats:
        now = self._clock()
        elapsed = max(now - self._started, 1e-9)
        engines = [e.stats(self.ledger.engine_samples[e.index], now, elapsed) for e in self._engines]
        o = self.ledger.outcomes
        return PoolStats(now - self._started, engines, o["ok"], o["error"] + o["failed"],
                         self.ledger.tickets_inflight(), self.ledger.queue.size,
                         samples_inflight=self.ledger.samples_inflight, queued_samples=self.ledger.queue.samples,
                         backing_off=len(self.ledger.backoff), continued=self.continued)

    @property
    def backlog_samples(self) -> int:
        """Samples queued in the pool, waiting for capacity."""
        return self.ledger.queue.samples

    @property
    def largest_pending_n(self) -> int:
        """The largest ``n`` waiting in the pool: no cap may stay below it (the controller's floor)."""
        return self.ledger.queue.largest_n()

    def engine_state(self, index: int) -> tuple[int, int, int, bool]:
        """(in-flight samples, cap, output tokens so far, healthy) of one engine."""
        e = self._engines[index]
        return self.ledger.engine_samples[index], e.cap, e.output_tokens_all, e.healthy

    def set_cap(self, index: int, cap: int, reason: str) -> None:
        """Apply a controller decision; in-flight work above a lowered cap drains, it is not cancelled."""
        e = self._engines[index]
        if cap == e.cap:
            return
        log.info("%s: cap %d -> %d (%s)", e.client.name, e.cap, cap, reason)
        if self.metrics is not None:
            self.metrics.cap_changes.labels(e.client.name, "up" if cap > e.cap else "down").inc()
        self._on_change("cap", e.client.name, e.cap, cap, reason)
        e.cap = cap
        self._wake.set()

    def set_pack_size(self, size: int, reason: str) -> None:
        """Samples per packed call from now on (the pack-size tuner's decision)."""
        if size == self.pack_size:
            return
        log.info("pool: pack %d -> %d (%s)", self.pack_size, size, reason)
        self._on_change("pack", "pool", self.pack_size, size, reason)
        self.admission.pack_size = size

    def set_speed(self, index: int, speed: float) -> None:
        """The monitor's verdict on an engine's decode speed against the fleet (routing weighs it)."""
        self._engines[index].speed = speed

    def move_calls(self, index: int, samples: int, avoid: frozenset[int] = frozenset()) -> int:
        """Cut engine ``index``'s newest calls, at least ``samples`` samples of them, to go on elsewhere
        (:data:`Cut.MOVE`: from their tokens when streamed), avoiding ``avoid`` too; returns the samples cut."""
        moved = 0
        for call in sorted((c for c in self.ledger.calls if c.engine == index), key=lambda c: -c.started):
            if moved >= samples:
                break
            if call.task is not None and not call.task.done() and call.cancel_reason is None:
                for u in call.units:
                    u.avoid = u.avoid | avoid
                self.resolver.cancel(call, Cut.MOVE)
                moved += call.samples
        return moved

    def _spreadable(self, call: Call) -> bool:
        return (call.task is not None and not call.task.done() and call.cancel_reason is None and not call.aborting
                and not any(u.spread for u in call.units))  # moved once: never again, nor what shares its call

    def movable_calls(self) -> tuple[list[int], list[int]]:
        """Per engine, the calls a step's end may move (:mod:`rollout_plugin.pool.policy.spread`: running, never
        moved, on an engine whose client can end a call engine-side with its tokens, ``aborts_calls``) and all
        its calls."""
        movable, calls = [0] * len(self._engines), [0] * len(self._engines)
        for call in self.ledger.calls:
            calls[call.engine] += 1
            if getattr(self._engines[call.engine].client, "aborts_calls", False) and self._spreadable(call):
                movable[call.engine] += 1
        return movable, calls

    def spread_calls(self, index: int, calls: int) -> int:
        """End engine ``index``'s ``calls`` oldest movable calls engine-side: each answers with its tokens so far
        (finish reason ``abort``) and its unfinished samples continue elsewhere, avoiding this engine; returns
        the samples they carried. An abort that fails leaves the call running (nothing is lost)."""
        e = self._engines[index]
        picked = [c for c in self.ledger.calls if c.engine == index and self._spreadable(c)][:calls]
        for call in picked:  # (the ledger keeps calls in the order they started: oldest first)
            call.aborting = True
            for u in call.units:
                u.mark_spread(index)
            self.supervisor.spawn(f"{e.client.name}-spread", e.client.abort_call(call.id, len(call.units)),
                                  on_error=lambda exc, n=e.client.name: log.warning(
                                      "%s: a call to move stays (abort failed: %s)", n, exc))
        return sum(c.samples for c in picked)

    def reset_stats(self) -> None:
        now = self._clock()
        self._started = now
        for e in self._engines:
            e.reset(self.ledger.engine_samples[e.index], now)

    @property
    def clients(self) -> list[EngineClient]:
        return [e.client for e in self._engines]

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Admit work until closed or failed. A bug in here fails the pool (callers get PoolError), never them."""
        try:
            while self.failure is None and not self._closing:
                self._wake.clear()
                if not self.paused:  # (closed or failed: the loop ends)
                    self.admission.round(self.global_cap)  # (a sum over the engines: once a round)
                await self._wake.wait()
        except Exception as exc:
            log.exception("dispatcher: running -> failed")
            self.fail(PoolError(f"the dispatcher failed: {type(exc).__name__}: {exc}"))
        finally:
            self.admission.close()
            self.membership.close()

    def close(self) -> None:
        """Every open request gets an error record now; running calls are cancelled (see :meth:`aclose`)."""
        if self._closing:
            return
        self._closing = True
        for ticket in list(self.ledger.tickets.values()):
            self.resolver.resolve(ticket, Result(id=ticket.request.id, error=CLOSED, request=ticket.request,
                                                 attempts=max((u.attempts for u in ticket.units), default=0)),
                                  outcome="closed")
        self.resolver.cancel_calls(lambda call: True, Cut.CLOSED)
        self._wake.set()

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """:meth:`close`, then wait (bounded) for the cancelled calls and the helpers to finish."""
        self.close()
        tasks = [c.task for c in self.ledger.calls if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        await self.supervisor.aclose(timeout_s)

    def fail(self, error: PoolError) -> None:
        """The pool cannot go on: every open request's waiter gets ``error`` raised."""
        if self.failure is not None:
            return
        self.failure = error
        log.error("pool: running -> failed (%s)", error)
        for ticket in list(self.ledger.tickets.values()):
            self.resolver.resolve(ticket, error=error)
            if ticket.future.done() and not ticket.future.cancelled():
                ticket.future.exception()  # retrieved: the pool's __aexit__ raises it once, not every future
        self.resolver.cancel_calls(lambda call: True, Cut.FAILED)
        self._wake.set()
