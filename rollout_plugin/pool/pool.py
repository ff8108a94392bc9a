"""The rollout pool: engines (launched or attached) + HTTP clients + the dispatcher.

Async core (``async with RolloutPool(...) as pool``) and a sync facade (:class:`SyncRolloutPool`)
that runs the same core on a private event loop thread, for trainers that call from sync code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future as ThreadFuture
from typing import TypeVar

import httpx

from rollout_plugin.config.schema import EngineConfig, GroupMode, PoolConfig
from rollout_plugin.errors import EngineError, PoolError
from rollout_plugin.pool.client import CallError, EngineClient, HttpEngineClient, split_base_url
from rollout_plugin.pool.control import ControllerConfig
from rollout_plugin.pool.dispatch import Dispatcher
from rollout_plugin.pool.stats import PoolStats
from rollout_plugin.pool.launcher import EngineEndpoint, EngineProcess
from rollout_plugin.pool.limits import Limits, derive_limits
from rollout_plugin.pool.metrics import PoolMetrics
from rollout_plugin.pool.monitor import Monitor
from rollout_plugin.pool.provider import EngineProvider, LocalEngines, make_provider
from rollout_plugin.pool.prewarm import WarmupReport, prewarm
from rollout_plugin.pool.ratelimit import RateLimits
from rollout_plugin.pool.timeline import TimelineRecorder
from rollout_plugin.types import Prompt, Request, Result

log = logging.getLogger(__name__)
T = TypeVar("T")


def pool_limits(engine: EngineConfig, pool: PoolConfig, engines: int) -> Limits:
    return derive_limits(max_model_len=engine.max_model_len, engines=engines, k=pool.k,
                         ratio=pool.over_concurrency_ratio, per_engine=pool.per_engine,
                         max_concurrent=pool.max_concurrent, max_num_seqs=engine.max_num_seqs)


async def _served_model(url: str, api_key: str | None, timeout_s: float) -> str:
    _, api_base = split_base_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as http:
            resp = await http.get(f"{api_base}/models")
            resp.raise_for_status()
            return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise EngineError(f"engine.urls: cannot list models at {api_base}/models ({exc}); "
                          f"set engine.served_model_name") from None


class RolloutPool:
    """``async with RolloutPool(engine_cfg, pool_cfg) as pool: results = await pool.generate(requests)``.

    Launches ``pool.engines`` vLLM servers (or attaches to ``engine.urls``), and stops what it
    launched on exit. ``clients`` injects ready engine clients instead (tests, custom transports).
    """

    def __init__(self, engine: EngineConfig | None = None, pool: PoolConfig | None = None,
                 controller: ControllerConfig | None = None, *, clients: Sequence[EngineClient] | None = None,
                 clock=time.monotonic, warm_prompt: Prompt | None = None,
                 client_factory: Callable[..., HttpEngineClient] = HttpEngineClient):
        self.engine_cfg = engine or EngineConfig()
        self.pool_cfg = pool or PoolConfig()
        self.controller_cfg = controller or ControllerConfig()
        self._clock = clock
        self.monitor: Monitor | None = None
        self._timeline: TimelineRecorder | None = None
        self._given_clients = list(clients) if clients else None
        n = len(self._given_clients or self.engine_cfg.urls) or self.pool_cfg.engines
        self.limits = pool_limits(self.engine_cfg, self.pool_cfg, n)
        self.provider: EngineProvider | None = None  # what launched our engines (None: attached or injected)
        self._given_up: set[int] = set()  # launched engines that stayed dead; new capacity retries them
        self.endpoints: list[EngineEndpoint] = []
        self.startup_s: list[float] = []
        self._clients: list[EngineClient] = []
        self._tg: asyncio.TaskGroup | None = None
        self._dispatcher: Dispatcher | None = None
        self._runner: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._restarting: set[asyncio.Task[None]] = set()  # cancelled on exit: a replacement may wait for a node
        self._restarts = [0] * n
        self._warm_prompt = warm_prompt  # the dataset's shared prefix, so the prefix cache starts warm
        self._client_factory = client_factory  # HttpEngineClient's signature; the gateway passes its own
        self.warmup: list[WarmupReport] = []

    def _record_change(self, kind: str, engine: str, old: object, new: object, reason: str) -> None:
        if self._timeline is not None:
            self._timeline.change(kind, self._clock(), engine, old, new, reason)

    @property
    def processes(self) -> list[EngineProcess]:
        """The local backend's engine processes (empty for attached, injected or Ray engines)."""
        return self.provider.processes if isinstance(self.provider, LocalEngines) else []

    def _will_restart(self, index: int) -> bool:
        """Called when an engine dies: restart it if we launched it and it has restarts left."""
        if self.provider is None or self._tg is None or self._restarts[index] >= self.pool_cfg.max_restarts:
            return False
        self._restarts[index] += 1
        task = self._tg.create_task(self._restart(index))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)
        return True

    async def _restart(self, index: int) -> None:
        name = self._clients[index].name
        log.warning("%s: dead -> restarting (restart %d of %d)", name, self._restarts[index],
                    self.pool_cfg.max_restarts)
        try:
            ep = await self.provider.replace(index)  # type: ignore[union-attr]
        except EngineError as exc:
            log.error("%s: restart failed: %s", name, exc)
            self._given_up.add(index)
            self._require().give_up(index, f"{name}: restart failed")
            return
        client = self._http_client(EngineEndpoint(name, ep.url, ep.api_key), self._clients[index].model)
        self._clients[index] = client
        if not self._given_clients:
            await prewarm([client], self.pool_cfg.prewarm, self._warm_prompt, clock=self._clock)
        stale = self._require().replace_client(index, client)
        if self.monitor is not None:
            self.monitor.reset_engine(index)
        await stale.aclose()

    # -- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> RolloutPool:
        try:
            self._clients = self._given_clients or await self._open_clients()
            # Before the dispatcher exists: no real request meets a cold engine. Attached engines (already
            # running, perhaps billed per call) only when asked.
            if not self._given_clients and (self.provider is not None or self.pool_cfg.prewarm.attached):
                self.warmup = await prewarm(self._clients, self.pool_cfg.prewarm, self._warm_prompt,
                                            clock=self._clock)
            names = [c.name for c in self._clients]
            if self.controller_cfg.timeline:
                self._timeline = TimelineRecorder(self.controller_cfg.timeline, names, self._clock())
            rl = self.engine_cfg.rate_limit
            self._dispatcher = Dispatcher(
                self._clients, self.limits, pack_size=self.pool_cfg.pack_size, max_retries=self.pool_cfg.max_retries,
                clock=self._clock, on_change=self._record_change,
                rate_limits=RateLimits(rl.rpm, rl.tpm, rl.burst_s) if (rl.rpm or rl.tpm) else None,
                backoff=(self.pool_cfg.backoff_base_s, self.pool_cfg.backoff_cap_s),
                metrics=PoolMetrics(self.pool_cfg.metrics_port), recover=self._will_restart,
                group_mode=GroupMode(self.pool_cfg.groups.mode).value,
                split_threshold=self.pool_cfg.groups.split_threshold, pack_timeout_s=self.pool_cfg.pack_timeout_s)
            self.monitor = Monitor(
                self._dispatcher, self._clients, self.controller_cfg, group_size=self.pool_cfg.k,
                expected_tokens=self.controller_cfg.expected_tokens or self.engine_cfg.max_model_len,
                ratio=self.pool_cfg.over_concurrency_ratio, clock=self._clock, timeline=self._timeline,
                stall_s=self.pool_cfg.timeouts.stall_s)
            self._tg = asyncio.TaskGroup()
            await self._tg.__aenter__()
            self._runner = self._tg.create_task(self._dispatcher.run(self._tg))
            self._monitor_task = self._tg.create_task(self.monitor.run())
            if self.provider is not None:
                self._watch_task = self._tg.create_task(self.provider.watch(self._engine_lost, self._capacity_grew))
        except BaseException:
            await self._close_clients()
            self._close_provider()
            raise
        log.info("pool ready: %d engine(s), per-engine cap %d (in flight %d), max_concurrent %d groups of k=%d",
                 len(self._clients), self.limits.per_engine, self.limits.engine_inflight,
                 self.limits.max_concurrent, self.limits.k)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        failure = self._dispatcher.failure if self._dispatcher else None
        try:
            if self._monitor_task is not None:
                self._monitor_task.cancel()
            if self._watch_task is not None:
                self._watch_task.cancel()
            for task in self._restarting:
                task.cancel()
            if self._dispatcher:
                self._dispatcher.close()
            if self._tg:
                # The caller's exception is theirs to propagate; the group only collects our tasks.
                await self._tg.__aexit__(None, None, None)
        finally:
            if self._timeline is not None:
                self._timeline.close()
            await self._close_clients()
            self._close_provider()
        if failure is not None and exc is None:
            raise failure

    async def _open_clients(self) -> list[EngineClient]:
        cfg, t = self.engine_cfg, self.pool_cfg.timeouts
        if cfg.urls:
            self.endpoints = [EngineEndpoint(f"engine{i}", url, cfg.api_key) for i, url in enumerate(cfg.urls)]
        else:
            self.endpoints = await self._launch()
        clients: list[EngineClient] = []
        for ep in self.endpoints:
            model = cfg.served_model_name or await _served_model(ep.url, ep.api_key, t.health_s)
            clients.append(self._http_client(ep, model))
        return clients

    def _http_client(self, ep: EngineEndpoint, model: str) -> HttpEngineClient:
        t = self.pool_cfg.timeouts
        return self._client_factory(
            ep.name, ep.url, api_key=ep.api_key, model=model, max_connections=self.limits.http_connections,
            connect_s=t.connect_s, request_s=t.request_s, admission_s=t.admission_s, health_s=t.health_s,
            stream=self.pool_cfg.stream, extra_body=dict(self.engine_cfg.extra_body))

    async def _launch(self) -> list[EngineEndpoint]:
        self.provider = make_provider(self.engine_cfg, self.pool_cfg)
        endpoints = await self.provider.start(self.pool_cfg.engines, self.limits.per_engine)
        self.startup_s = self.provider.startup_s
        return endpoints

    def _close_provider(self) -> None:
        if self.provider is not None:
            self.provider.close()

    def _engine_lost(self, index: int, reason: str) -> None:
        """The backend saw an engine go (a Ray actor or node lost) before any call failed on it."""
        self._require().mark_dead(index, reason)

    def _capacity_grew(self, reason: str) -> None:
        """New nodes: engines given up for want of resources get another try (restarts permitting);
        with no slot to refill, a backend that can grow adds an engine (up to its own bound)."""
        if self._given_up:
            log.info("pool: retrying given-up engine(s) %s (%s)", sorted(self._given_up), reason)
        for index in sorted(self._given_up):
            if self._will_restart(index):
                self._given_up.discard(index)
        if (not self._given_up and self._tg is not None and self.provider is not None
                and self.provider.can_grow(len(self._clients))):
            task = self._tg.create_task(self._grow(reason))
            self._restarting.add(task)  # cancelled on exit like a pending restart
            task.add_done_callback(self._restarting.discard)

    async def _grow(self, reason: str) -> None:
        try:
            endpoint = await self.provider.add()  # type: ignore[union-attr]
        except EngineError as exc:
            log.warning("pool: no engine added (%s): %s", reason, exc)
            return
        await self.add_engine(endpoint)

    async def add_engine(self, endpoint: EngineEndpoint) -> int:
        """Put one more running engine into rotation (a Ray node joined, or the caller attaches a URL);
        returns its index. It is warmed first (like a launched engine) and the global cap grows with it."""
        dispatcher = self._require()
        cfg = self.engine_cfg
        model = cfg.served_model_name or await _served_model(endpoint.url, endpoint.api_key,
                                                              self.pool_cfg.timeouts.health_s)
        client = self._http_client(endpoint, model)
        if self.provider is not None or self.pool_cfg.prewarm.attached:
            await prewarm([client], self.pool_cfg.prewarm, self._warm_prompt, clock=self._clock)
        self.limits = pool_limits(cfg, self.pool_cfg, len(self._clients) + 1)
        self._clients.append(client)
        self._restarts.append(0)
        self.endpoints.append(endpoint)
        return dispatcher.add_client(client, self.limits)

    async def _close_clients(self) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients = []

    # -- work -------------------------------------------------------------------------------------
    def _require(self) -> Dispatcher:
        if self._dispatcher is None:
            raise PoolError("use the pool inside `async with RolloutPool(...) as pool`")
        return self._dispatcher

    def submit(self, request: Request) -> asyncio.Future[Result]:
        """Queue one request; the future resolves to its one :class:`Result` (samples or error)."""
        return self._require().submit(request)

    async def generate(self, requests: Iterable[Request]) -> list[Result]:
        """All results, in input order."""
        futures = [self.submit(r) for r in requests]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for f in futures:
                f.cancel()

    async def stream(self, requests: Iterable[Request]) -> AsyncIterator[Result]:
        """Results as they finish. Requests are submitted as admission allows, not all up front."""
        futures = [self.submit(r) for r in requests]
        try:
            for next_done in asyncio.as_completed(futures):
                yield await next_done
        finally:
            for f in futures:
                f.cancel()

    def stats(self) -> PoolStats:
        return self._require().stats()

    def metrics_text(self) -> str:
        """The pool's ``rollout_pool_*`` metrics in Prometheus text format."""
        metrics = self._require().metrics
        return metrics.text() if metrics is not None else ""

    @contextlib.asynccontextmanager
    async def weight_update(self, version: int | None = None, *, abort: bool = False) -> AsyncIterator[None]:
        """Pause admission, drain (or ``abort`` and requeue) in-flight work, yield for the weight load,
        then resume with the new version; every later result carries it."""
        d = self._require()
        d.pause()
        if abort:
            d.abort_inflight()
        await d.wait_idle()
        try:
            yield
        finally:
            d.resume(version if version is not None else d.weight_version + 1)

    @property
    def weight_version(self) -> int:
        return self._require().weight_version

    async def call_engines(self, path: str, body: dict | None = None, *, timeout_s: float | None = None) -> list:
        """POST a control call (e.g. ``/collective_rpc`` in vLLM dev mode) to every engine at once; the answers
        in engine order, or the first failure raised as :class:`EngineError`."""
        self._require()
        clients = list(self._clients)
        if not all(hasattr(c, "admin") for c in clients):
            raise PoolError(f"POST {path}: some engine clients have no control endpoint (only HTTP engines do)")
        try:
            async with asyncio.TaskGroup() as tg:
                calls = [tg.create_task(c.admin(path, body, timeout_s=timeout_s)) for c in clients]  # type: ignore[attr-defined]
        except* CallError as group:
            raise EngineError(str(group.exceptions[0])) from None
        return [c.result() for c in calls]

    def reset_stats(self) -> None:
        self._require().reset_stats()

    @property
    def engine_names(self) -> list[str]:
        return [c.name for c in self._clients]


class SyncRolloutPool:
    """Blocking facade: the async pool runs on a private loop thread for the facade's lifetime."""

    def __init__(self, engine: EngineConfig | None = None, pool: PoolConfig | None = None, **kwargs):
        self._pool = RolloutPool(engine, pool, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def limits(self) -> Limits:
        return self._pool.limits

    @property
    def endpoints(self) -> list[EngineEndpoint]:
        return self._pool.endpoints

    def __enter__(self) -> SyncRolloutPool:
        ready: ThreadFuture[None] = ThreadFuture()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="rollout-pool", daemon=True)
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join()

    def _serve(self, ready: ThreadFuture[None]) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                async with self._pool:
                    ready.set_result(None)
                    await self._stop.wait()
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
                else:
                    log.error("pool stopped with an error: %s", exc)

        asyncio.run(main())

    def _run(self, coro):
        if self._loop is None:
            raise PoolError("use the pool inside `with SyncRolloutPool(...) as pool`")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        return self._run(self._pool.generate(list(requests)))

    def stream(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Results as they finish, in this thread."""
        results: list[Result] = []
        lock = threading.Condition()
        requests = list(requests)

        async def feed() -> None:
            async for result in self._pool.stream(requests):
                with lock:
                    results.append(result)
                    lock.notify()

        done = asyncio.run_coroutine_threadsafe(feed(), self._loop)  # type: ignore[arg-type]
        given = 0
        while given < len(requests):
            with lock:
                lock.wait_for(lambda: len(results) > given or done.done())
                batch = results[given:]
            if not batch:
                done.result()  # re-raises what stopped the feed
                return
            given += len(batch)
            yield from batch

    def stats(self) -> PoolStats:
        return self._pool.stats()

    def run(self, fn: Callable[[RolloutPool], Awaitable[T]]) -> T:
        """``await fn(pool)`` on the pool's loop and return its value (e.g. a weight update)."""
        async def call() -> T:
            return await fn(self._pool)

        return self._run(call())

    @property
    def weight_version(self) -> int:
        return self._pool.weight_version
