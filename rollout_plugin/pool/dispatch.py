"""Admission, packing, routing, retries and exactly-once bookkeeping.

Policy lives here and in :mod:`routing`/:mod:`limits`; transport lives behind :class:`EngineClient`.
Invariants (each has a test):
1. every submitted request id resolves exactly once: a :class:`Result` with samples or with an error;
2. samples in flight per engine never exceed ``limits.engine_inflight``; groups in flight never
   exceed ``limits.max_concurrent``;
3. a pool that cannot go on (no healthy engine) fails every waiting request with :class:`PoolError`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.client import CallError, EngineClient, Generation
from rollout_plugin.pool.limits import Limits
from rollout_plugin.pool.metrics import PoolMetrics
from rollout_plugin.pool.queue import GroupJoin, Pending, PendingQueue
from rollout_plugin.pool.ratelimit import RateLimiter, RateLimits, backoff_delay
from rollout_plugin.pool.routing import EngineLoad, pack_budget, pick_engine, split_group
from rollout_plugin.pool.stats import EngineStats, PoolStats
from rollout_plugin.types import Request, Result

log = logging.getLogger(__name__)


@dataclass
class _Engine:
    index: int
    client: EngineClient
    cap: int
    healthy: bool = True
    suspect: bool = False
    inflight: int = 0
    calls: int = 0
    requests: int = 0
    samples: int = 0
    output_tokens: int = 0
    failed_calls: int = 0
    output_tokens_all: int = 0  # never reset: the controller's client-side throughput signal
    area: float = 0.0  # ∫ inflight dt, for the mean
    since: float = 0.0
    peak: int = 0
    tasks: set = field(default_factory=set)  # this engine's running calls
    rescue: bool = False  # cancels of its calls are ours (weight-sync abort): requeue, don't drop
    limiter: RateLimiter | None = None  # hosted APIs: RPM/TPM token buckets
    recovering: bool = False  # dead, but a restart is under way

    def load(self) -> EngineLoad:
        return EngineLoad(self.index, self.inflight, self.cap, self.healthy and not self.suspect)

    def move(self, delta: int, now: float) -> None:
        self.area += self.inflight * (now - self.since)
        self.since = now
        self.inflight += delta
        self.peak = max(self.peak, self.inflight)


class Dispatcher:
    """Runs inside the pool's TaskGroup: ``tg.create_task(dispatcher.run(tg))``."""

    def __init__(self, clients: Sequence[EngineClient], limits: Limits, *, pack_size: int, max_retries: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str, object, object, str], None] | None = None,
                 rate_limits: RateLimits | None = None, backoff: tuple[float, float] = (0.5, 30.0),
                 rand: Callable[[], float] = random.random, metrics: PoolMetrics | None = None,
                 recover: Callable[[int], bool] | None = None, group_mode: str = "auto",
                 split_threshold: float = 0.25, pack_timeout_s: float = 0.0):
        if not clients:
            raise PoolError("a pool needs at least one engine")
        self.limits = limits
        self.pack_size = pack_size
        self.max_retries = max_retries
        # GRPO groups: "auto" keeps n=k on one engine unless the split gate opens (routing.split_group),
        # "together" never splits, "split" sends every sample as its own request.
        self.group_mode = group_mode
        self.split_threshold = split_threshold
        self.groups_split = 0
        # distllm's batch timeout: when requests trickle in, wait this long for a pack to fill
        self.pack_timeout_s = pack_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._clock = clock
        self._on_change = on_change or (lambda kind, engine, old, new, reason: None)
        now = clock()
        self._started = now
        self._engines = [_Engine(i, c, limits.engine_inflight, since=now,
                                 limiter=RateLimiter(rate_limits, now) if rate_limits else None)
                         for i, c in enumerate(clients)]
        self._rate_limits = rate_limits
        self._backoff = backoff
        self._rand = rand
        self.metrics = metrics
        self._recover = recover or (lambda index: False)  # asked when an engine dies: will it come back?
        self._queue = PendingQueue()
        self._ids: set[str] = set()
        self._seq = itertools.count()
        self._groups_inflight = 0
        self._done = 0
        self._failed = 0
        self._wake = asyncio.Event()
        self._closing = False
        self.failure: PoolError | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.paused = False
        self.weight_version = 0

    # -- public -----------------------------------------------------------------------------------
    def submit(self, request: Request) -> asyncio.Future[Result]:
        if self.failure is not None:
            raise self.failure
        if self._closing:
            raise PoolError("the pool is closed")
        if request.id in self._ids:
            raise ValueError(f"request id {request.id!r} is already in flight; ids must be unique")
        if request.n > self.limits.engine_inflight:
            raise ValueError(f"request {request.id!r} asks n={request.n} samples, above one engine's in-flight cap "
                             f"({self.limits.engine_inflight}); raise pool.per_engine")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._ids.add(request.id)
        pending = Pending(request, future, next(self._seq), queued_at=self._clock())
        if self.group_mode == "split" and request.n > 1:
            join = GroupJoin(pending, request.n)
            for part in range(request.n):
                self._queue.push(pending.piece(join, part, 1))
        else:
            self._queue.push(pending)
        self._wake.set()
        return future

    def stats(self) -> PoolStats:
        now = self._clock()
        elapsed = max(now - self._started, 1e-9)
        engines = [
            EngineStats(e.client.name, e.healthy, e.inflight, e.cap, e.calls, e.requests, e.samples,
                        e.output_tokens, e.failed_calls, (e.area + e.inflight * (now - e.since)) / elapsed, e.peak)
            for e in self._engines
        ]
        return PoolStats(now - self._started, engines, self._done, self._failed, self._groups_inflight,
                         self._queue.size)

    @property
    def backlog_samples(self) -> int:
        """Samples queued in the pool, waiting for capacity."""
        return self._queue.samples

    def engine_state(self, index: int) -> tuple[int, int, int, bool]:
        """(in-flight samples, cap, output tokens so far, healthy) of one engine."""
        e = self._engines[index]
        return e.inflight, e.cap, e.output_tokens_all, e.healthy

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
        self.pack_size = size

    def reset_stats(self) -> None:
        now = self._clock()
        self._started = now
        for e in self._engines:
            e.area, e.since, e.peak = 0.0, now, e.inflight
            e.calls = e.requests = e.samples = e.output_tokens = e.failed_calls = 0

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Dispatch until closed or failed; on close, cancel calls still running (their waiters too)."""
        self._tg = tg
        try:
            while self.failure is None and not self._closing:
                self._dispatch()
                self._wake.clear()
                await self._wake.wait()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._fail(self.failure or PoolError("the pool was closed before this request finished"))
            for task in list(self._calls):
                task.cancel()

    # -- policy -----------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self._tg is None:
            raise RuntimeError("Dispatcher.run() was not started")
        waiting: set[tuple] = set()  # keys holding back for their pack to fill
        while self._queue.size and self._groups_inflight < self.limits.max_concurrent and not self.paused:
            key = self._queue.oldest_key(waiting)
            if key is None:
                return
            head = self._queue.peek(key)
            if head.future.cancelled():  # its waiter is gone (a stream closed early): don't generate it
                self._ids.discard(self._queue.pop(key).request.id)
                continue
            loads = [e.load() for e in self._engines]
            if head.request.n > 1 and head.join is None and self.group_mode == "auto":
                parts = split_group(loads, head.request.n, head.avoid, self.split_threshold)
                if not parts:
                    return
                if len(parts) > 1:
                    self._send_split(self._queue.pop(key), parts)
                    continue
                idx = parts[0][0]
            else:
                idx = pick_engine(loads, head.request.n, head.avoid)
            if idx is None:
                return
            engine = self._engines[idx]
            budget = pack_budget(engine.cap - engine.inflight, max(self.pack_size, head.request.n))
            if self._hold_for_pack(key, head, budget):
                waiting.add(key)
                continue
            batch: list[Pending] = []
            while True:
                nxt = self._queue.peek(key)
                if nxt is not None and nxt.future.cancelled() and batch:
                    self._ids.discard(self._queue.pop(key).request.id)
                    continue
                if nxt is None or nxt.request.n > budget:
                    break
                if batch and (key[0] in ("solo", "chat")
                              or self._groups_inflight + len(batch) >= self.limits.max_concurrent):
                    break
                batch.append(self._queue.pop(key))
                budget -= nxt.request.n
            self._send(engine, batch)

    def _hold_for_pack(self, key: tuple, head: Pending, budget: int) -> bool:
        """Wait for more compatible requests (up to the pack timeout) rather than send a small pack."""
        if self.pack_timeout_s <= 0 or key[0] in ("solo", "chat") or head.join is not None:
            return False
        if self._queue.samples_by_key.get(key, 0) >= budget:
            return False
        wait = head.queued_at + self.pack_timeout_s - self._clock()
        if wait <= 0:
            return False
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer.when() > loop.time() + wait:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_later(wait, self._wake.set)
        return True

    def _send_split(self, group: Pending, parts: list[tuple[int, int]]) -> None:
        """Send a group's samples to several engines, as pieces that join into one result."""
        self.groups_split += 1
        names = ", ".join(f"{self._engines[i].client.name}×{n}" for i, n in parts)
        log.debug("%s: group of %d split (%s)", group.request.id, group.request.n, names)
        join = GroupJoin(group, len(parts))
        for part, (idx, n) in enumerate(parts):
            self._send(self._engines[idx], [group.piece(join, part, n)])

    def _send(self, engine: _Engine, batch: list[Pending]) -> None:
        samples = sum(p.request.n for p in batch)
        engine.move(samples, self._clock())
        self._groups_inflight += len(batch)
        for p in batch:
            p.attempts += 1
        task = self._tg.create_task(self._call(engine, batch, self.weight_version))
        self._calls.add(task)
        engine.tasks.add(task)
        task.add_done_callback(functools.partial(self._call_done, engine=engine, batch=batch, samples=samples))

    async def _call(self, engine: _Engine, batch: list[Pending], version: int) -> None:
        """One HTTP call. Bookkeeping lives in :meth:`_call_done`, which runs even if this never starts."""
        reserved = sum(p.request.n * p.request.sampling.max_tokens for p in batch)
        if engine.limiter is not None:
            delay = engine.limiter.reserve(self._clock(), 1, reserved)
            while delay > 0:  # the provider's rate limit, not a synchronisation
                await asyncio.sleep(delay)
                delay = engine.limiter.hold(self._clock())
        started = self._clock()
        try:
            generations = await engine.client.generate([p.request for p in batch])
        except CallError as exc:
            if engine.limiter is not None:
                engine.limiter.settle(self._clock(), reserved, 0)
                if exc.status == 429:
                    engine.limiter.penalize(self._clock(), exc.retry_after_s)
            self._on_failure(engine, batch, exc)
        except Exception as exc:  # a bug or a malformed reply: data for these requests, not a dead pool
            log.exception("%s: call failed unexpectedly", engine.client.name)
            self._on_failure(engine, batch, CallError(f"{type(exc).__name__}: {exc}", retryable=False))
        else:
            latency = self._clock() - started
            engine.calls += 1
            if self.metrics is not None:
                name = engine.client.name
                self.metrics.latency.labels(name).observe(latency)
                self.metrics.output_tokens.labels(name).inc(sum(g.output_tokens for g in generations))
            if engine.limiter is not None:
                engine.limiter.settle(self._clock(), reserved, sum(g.prompt_tokens + sum(
                    s.output_tokens for s in g.samples) for g in generations))
            for p, gen in zip(batch, generations):
                self._resolve(p, self._result(p, gen, engine, latency, version))
                tokens = sum(s.output_tokens for s in gen.samples)
                engine.requests += 1
                engine.samples += len(gen.samples)
                engine.output_tokens += tokens
                engine.output_tokens_all += tokens

    def _call_done(self, task: asyncio.Task[None], engine: _Engine, batch: list[Pending], samples: int) -> None:
        self._calls.discard(task)
        engine.tasks.discard(task)
        engine.move(-samples, self._clock())
        self._groups_inflight -= len(batch)
        self._wake.set()
        if task.cancelled() and not self._rescue(engine, batch):
            for p in batch:
                self._ids.discard(p.request.id)
                p.future.cancel()

    @staticmethod
    def _result(p: Pending, gen: Generation, engine: _Engine, latency: float, version: int) -> Result:
        return Result(id=p.request.id, samples=gen.samples, prompt_tokens=gen.prompt_tokens,
                      engine=engine.client.name, latency_s=latency, attempts=p.attempts, request=p.request,
                      weight_version=version)

    def _rescue(self, engine: _Engine, batch: list[Pending]) -> bool:
        """Requeue a cancelled call's requests (same ids) when the cancel was ours: engine dead or aborted."""
        if self._closing or self.failure is not None or not (engine.rescue or not engine.healthy):
            return False
        for p in reversed(batch):
            p.attempts -= 1  # not the request's fault
            p.avoid = p.avoid | {engine.index}
            self._requeue(p)
        return True

    def mark_dead(self, index: int, reason: str) -> None:
        """Take an engine out of rotation and move its in-flight work elsewhere under the same ids."""
        e = self._engines[index]
        if not e.healthy:
            return
        e.healthy = False
        log.error("%s: healthy -> dead (%s); moving %d in-flight call(s)", e.client.name, reason, len(e.tasks))
        e.recovering = self._recover(index)
        self._on_change("health", e.client.name, "healthy", "dead", reason)
        for task in list(e.tasks):
            task.cancel()
        self.fail_if_hopeless(f"{e.client.name}: {reason}")
        self._wake.set()

    def fail_if_hopeless(self, reason: str) -> None:
        """No engine healthy and none coming back: the pool cannot go on."""
        if not any(x.healthy or x.recovering for x in self._engines):
            self._fail(PoolError(f"every engine is dead; last: {reason}"))

    def replace_client(self, index: int, client: EngineClient) -> EngineClient:
        """A restarted engine rejoins rotation with a fresh client and the starting cap; returns the old client."""
        e = self._engines[index]
        old, e.client = e.client, client
        e.healthy, e.suspect, e.recovering, e.cap = True, False, False, self.limits.engine_inflight
        log.info("%s: dead -> healthy (restarted)", client.name)
        self._on_change("health", client.name, "dead", "healthy", "restarted")
        self._wake.set()
        return old

    def add_client(self, client: EngineClient, limits: Limits) -> int:
        """A new engine joins rotation (a node joined, an engine was attached); returns its index.

        ``limits`` are the pool's for the new engine count: the global cap grows with the pool.
        """
        now = self._clock()
        self.limits = limits
        index = len(self._engines)
        self._engines.append(_Engine(index, client, limits.engine_inflight, since=now,
                                     limiter=RateLimiter(self._rate_limits, now) if self._rate_limits else None))
        log.info("%s: absent -> healthy (joined; %d engines)", client.name, len(self._engines))
        self._on_change("health", client.name, "absent", "healthy", "joined")
        self._wake.set()
        return index

    def give_up(self, index: int, reason: str) -> None:
        """A restart failed: the engine stays dead."""
        self._engines[index].recovering = False
        self.fail_if_hopeless(reason)
        self._wake.set()

    @property
    def clients(self) -> list[EngineClient]:
        return [e.client for e in self._engines]

    # -- weight sync ------------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop admitting new calls (queued work waits); in-flight calls go on."""
        if not self.paused:
            log.info("pool: running -> paused (weight sync)")
        self.paused = True

    def abort_inflight(self) -> int:
        """Cancel every running call and requeue its requests under the same ids; returns the count."""
        count = 0
        for e in self._engines:
            e.rescue = True
            count += len(e.tasks)
            for task in list(e.tasks):
                task.cancel()
        return count

    async def wait_idle(self) -> None:
        """Until no call is in flight (admission should be paused first)."""
        while self._calls:
            await asyncio.wait(set(self._calls))
        for e in self._engines:
            e.rescue = False

    def resume(self, weight_version: int | None = None) -> None:
        if weight_version is not None:
            self.weight_version = weight_version
        if self.paused:
            log.info("pool: paused -> running (weight version %d)", self.weight_version)
        self.paused = False
        self._wake.set()

    def _on_failure(self, engine: _Engine, batch: list[Pending], exc: CallError) -> None:
        engine.failed_calls += 1
        log.warning("%s: call of %d request(s) failed: %s", engine.client.name, len(batch), exc)
        if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429 and len(batch) > 1:
            # One bad member fails a packed call: resend each alone so only the bad one errors.
            for p in reversed(batch):
                p.solo, p.attempts = True, p.attempts - 1
                self._requeue(p)
            return
        if exc.suspect and engine.healthy and not engine.suspect:
            engine.suspect = True
            self._tg.create_task(self._probe(engine, str(exc)))
        elsewhere = any(e.healthy and not e.suspect and e.index != engine.index for e in self._engines)
        for p in reversed(batch):
            if exc.retryable and p.attempts <= self.max_retries:
                p.avoid = p.avoid | {engine.index}
                if exc.retry_after_s is not None or not elsewhere:
                    # Nowhere else to go (or the server said when): back off with full jitter.
                    delay = exc.retry_after_s if exc.retry_after_s is not None else backoff_delay(
                        p.attempts - 1, self._backoff[0], self._backoff[1], self._rand())
                    self._tg.create_task(self._requeue_later(p, delay))
                else:
                    self._requeue(p)
            else:
                self._resolve(p, Result(id=p.request.id, engine=engine.client.name, attempts=p.attempts,
                                        error=str(exc), request=p.request))

    async def _requeue_later(self, p: Pending, delay_s: float) -> None:
        await asyncio.sleep(delay_s)  # honouring the server's Retry-After, not synchronising
        self._requeue(p)
        self._wake.set()

    def _requeue(self, p: Pending) -> None:
        if self.failure is not None:
            self._ids.discard(p.request.id)
            if not p.future.done():
                p.future.set_exception(self.failure)
        else:
            self._queue.push(p, front=True)

    async def _probe(self, engine: _Engine, reason: str) -> None:
        alive = await engine.client.healthy()
        engine.suspect = False
        if alive:
            log.info("%s: suspect -> healthy (health check passed)", engine.client.name)
        else:
            self.mark_dead(engine.index, reason)
        self._wake.set()

    def _fail(self, error: PoolError) -> None:
        """Fail everything still queued (and whatever a running call hands back later)."""
        self.failure = error
        for p in self._queue.drain():
            self._ids.discard(p.request.id)
            if not p.future.done():
                p.future.set_exception(error)

    def _resolve(self, p: Pending, result: Result) -> None:
        if p.join is not None:  # a piece of a split group: the group resolves once, when complete
            whole = p.join.add(p.part, result)
            if whole is not None:
                self._resolve(p.join.parent, whole)
            return
        self._ids.discard(p.request.id)
        if self.metrics is not None:
            self.metrics.results.labels(result.engine or "none", "ok" if result.ok else "error").inc()
        if result.ok:
            self._done += 1
        else:
            self._failed += 1
        if not p.future.done():  # the waiter may have been cancelled
            p.future.set_result(result)
