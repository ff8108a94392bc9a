"""The rollout pool: engines (launched or attached) + HTTP clients + the dispatcher.

Async core (``async with RolloutPool(...) as pool``): lifecycle, engines joining and restarting, and
generation; its operations beside generation (pause, weight updates, step quotas, engine RPCs, refits) are a
part it composes, :class:`~.operations.Operations` (its public methods forward there); the blocking facade
:class:`SyncRolloutPool` is in :mod:`.blocking`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import httpx

from rollout_plugin.config.schema import EngineConfig, GroupMode, PoolConfig
from rollout_plugin.errors import EngineError, PoolError
from rollout_plugin.pool.transport.http import HttpEngineClient, split_base_url
from rollout_plugin.pool.policy.caps import ControllerConfig
from rollout_plugin.pool.dispatch.dispatcher import Dispatcher
from rollout_plugin.pool.core.engine_client import EngineClient
from rollout_plugin.pool.engines.launcher import EngineEndpoint, EngineProcess
from rollout_plugin.pool.policy.limits import Limits, derive_limits
from rollout_plugin.pool.observe.metrics import PoolMetrics
from rollout_plugin.pool.dispatch.monitor import Monitor
from rollout_plugin.pool.api.operations import Operations, PushedWeights
from rollout_plugin.pool.engines.prewarm import WarmupReport, prewarm
from rollout_plugin.pool.engines.backends import make_provider
from rollout_plugin.pool.engines.provider import EngineProvider, LocalEngines
from rollout_plugin.pool.policy.ratelimit import RateLimits
from rollout_plugin.pool.engines.server_check import DEV_MODE_ENDPOINTS, check_servers
from rollout_plugin.pool.observe.stats import PoolStats
from rollout_plugin.pool.dispatch.supervisor import Supervisor
from rollout_plugin.pool.observe.timeline import TimelineRecorder
from rollout_plugin.pool.weights.update import UpdateGate
from rollout_plugin.pool.weights.sources import WeightSource
from rollout_plugin.types import Prompt, Request, Result

log = logging.getLogger(__name__)


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


def _operation(name: str):
    """``RolloutPool.<name>`` is the pool's :class:`Operations` part's (same signature, same docstring)."""
    impl = inspect.getattr_static(Operations, name)
    if isinstance(impl, property):
        return property(lambda self: getattr(self._ops, name), doc=impl.__doc__)
    if inspect.iscoroutinefunction(impl):
        @functools.wraps(impl)
        async def forward(self, *args, **kwargs):
            return await getattr(self._ops, name)(*args, **kwargs)
    else:
        @functools.wraps(impl)
        def forward(self, *args, **kwargs):
            return getattr(self._ops, name)(*args, **kwargs)
    return forward


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
        self._supervisor: Supervisor | None = None  # the pool's helpers: monitor, node watch, restarts, growth
        self._dispatcher: Dispatcher | None = None
        self._restarts = [0] * n
        self._warm_prompt = warm_prompt  # the dataset's shared prefix, so the prefix cache starts warm
        self._client_factory = client_factory  # HttpEngineClient's signature; the gateway passes its own
        self.warmup: list[WarmupReport] = []
        self._weight_source: WeightSource | None = None  # the last weights loaded by update_weights: refits use it
        self._updates = UpdateGate()  # one weight update or refit at a time (pool/weights/update.py)
        self._ops = Operations(self, dispatcher=self._require, clients=lambda: self._clients, gate=self._updates,
                               source=lambda: self._weight_source, pool_cfg=self.pool_cfg)

    # the operations beside generation (rollout_plugin.pool.api.operations)
    pause = _operation("pause")
    resume = _operation("resume")
    paused = _operation("paused")
    weight_update = _operation("weight_update")
    steps = _operation("steps")
    update_weights = _operation("update_weights")
    live_engines = _operation("live_engines")
    weight_version = _operation("weight_version")
    engine_rpc = _operation("engine_rpc")
    stale_engines = _operation("stale_engines")
    rejoin_after_push = _operation("rejoin_after_push")
    _refit_locked = _operation("refit_locked")  # the update sequence refits under its own lock

    def _record_change(self, kind: str, engine: str, old: object, new: object, reason: str) -> None:
        if self._timeline is not None:
            self._timeline.change(kind, self._clock(), engine, old, new, reason)

    @property
    def processes(self) -> list[EngineProcess]:
        """The local backend's engine processes (empty for attached, injected or Ray engines)."""
        return self.provider.processes if isinstance(self.provider, LocalEngines) else []

    def _will_restart(self, index: int) -> bool:
        """Asked by the dispatcher when an engine dies (it then moves dead -> restarting): restart it if we
        launched it and it has restarts left."""
        if self.provider is None or self._supervisor is None or self._restarts[index] >= self.pool_cfg.max_restarts:
            return False
        self._restarts[index] += 1
        log.info("%s: restart %d of %d", self._clients[index].name, self._restarts[index], self.pool_cfg.max_restarts)
        self._supervisor.spawn(f"{self._clients[index].name}-restart", self._restart(index),
                               on_error=lambda exc: self._restart_failed(index, exc))
        return True

    def _restart_failed(self, index: int, exc: BaseException) -> None:
        self._given_up.add(index)
        self._require().restart_failed(index, f"{self._clients[index].name}: restart failed: {exc}")

    async def _restart(self, index: int) -> None:
        name = self._clients[index].name
        ep = await self.provider.replace(index)  # type: ignore[union-attr]  # failures: _restart_failed
        client = self._http_client(EngineEndpoint(name, ep.url, ep.api_key), self._clients[index].model)
        self._clients[index] = client
        if not self._given_clients:
            await prewarm([client], self.pool_cfg.prewarm, self._warm_prompt, clock=self._clock)
        d = self._require()
        changed = d.weight_version != 0  # it restarted with the initial weights, the pool has moved on
        old = d.replace_client(index, client, stale=changed)
        if self.monitor is not None:
            self.monitor.reset_engine(index)
        await old.aclose()
        if changed:
            await self._ops.refit_stale([name])

    def expect_weight_pushes(self, description: str) -> None:
        """The trainer loads weights into every engine at each sync (TRL's NCCL transport) rather than giving
        the pool a source it can load any time: an engine that restarts stale then waits for the next sync
        (its load reaches every engine; :meth:`rejoin_after_push` checks it in) instead of failing the pool.
        A later :meth:`update_weights` source replaces this."""
        self._weight_source = PushedWeights(description)
        self._require().fail_if_hopeless(f"weights now arrive by {description}")

    # -- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> RolloutPool:
        try:
            self._clients = self._given_clients or await self._open_clients()
            # Before the dispatcher exists: no real request meets a cold engine. Attached engines (already
            # running, perhaps billed per call) only when asked.
            if not self._given_clients and (self.provider is not None or self.pool_cfg.prewarm.attached):
                self.warmup = await prewarm(self._clients, self.pool_cfg.prewarm, self._warm_prompt,
                                            clock=self._clock)
            self._start_core()
            await self.monitor.first_look()  # type: ignore[union-attr]
        except BaseException:
            await self._close_clients()
            self._close_provider()
            raise
        log.info("pool ready: %d engine(s), per-engine cap %d (in flight %d), global cap %d samples (k=%d)",
                 len(self._clients), self.limits.per_engine, self.limits.engine_inflight,
                 self.limits.global_samples, self.limits.k)
        return self

    def _start_core(self) -> None:
        """The dispatcher and its supervised helpers (monitor, node watch); no caller's task is their parent."""
        names = [c.name for c in self._clients]
        if self.controller_cfg.timeline:
            self._timeline = TimelineRecorder(self.controller_cfg.timeline, names, self._clock())
        rl = self.engine_cfg.rate_limit
        self._supervisor = sup = Supervisor()
        self._dispatcher = d = Dispatcher(
            self._clients, self.limits, pack_size=self.pool_cfg.pack_size, max_retries=self.pool_cfg.max_retries,
            clock=self._clock, on_change=self._record_change,
            rate_limits=RateLimits(rl.rpm, rl.tpm, rl.burst_s) if (rl.rpm or rl.tpm) else None,
            backoff=(self.pool_cfg.backoff_base_s, self.pool_cfg.backoff_cap_s),
            metrics=PoolMetrics(self.pool_cfg.metrics_port), recover=self._will_restart,
            can_refit=self._ops.refit_kind, hopeless_s=self.pool_cfg.timeouts.hopeless_s,
            group_mode=GroupMode(self.pool_cfg.groups.mode).value,
            split_threshold=self.pool_cfg.groups.split_threshold, pack_timeout_s=self.pool_cfg.pack_timeout_s,
            supervisor=sup, affinity_max_keys=self.pool_cfg.affinity_max_keys,
            affinity_ttl_s=self.pool_cfg.affinity_ttl_s)
        self.monitor = Monitor(
            d, self._clients, self.controller_cfg, group_size=self.pool_cfg.k,
            expected_tokens=self.controller_cfg.expected_tokens or self.engine_cfg.max_model_len,
            ratio=self.pool_cfg.over_concurrency_ratio, clock=self._clock, timeline=self._timeline,
            stall_s=self.pool_cfg.timeouts.stall_s, max_num_seqs=self.engine_cfg.max_num_seqs)
        sup.spawn("dispatcher", d.run(), on_error=lambda exc: d.fail(PoolError(f"the dispatcher failed: {exc}")))
        sup.spawn("monitor", self.monitor.run())
        if self.provider is not None:
            sup.spawn("engine-watch", self.provider.watch(self._engine_lost, self._capacity_grew))

    async def __aexit__(self, exc_type, exc, tb) -> None:
        failure = self._dispatcher.failure if self._dispatcher else None
        try:
            if self._dispatcher is not None:
                await self._dispatcher.aclose()  # every open request gets its record; calls stop
            if self._supervisor is not None:
                await self._supervisor.aclose()  # monitor, watch, probes, restarts, growth
        finally:
            if self._timeline is not None:
                self._timeline.close()
            await self._updates.quiesce(self.pool_cfg.timeouts.health_s * 6)  # no engine left paused by an update
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
        # vLLM's version and, with engine.dev_mode, the control endpoints the pool calls: one line if not.
        await check_servers([(ep.name, ep.url, ep.api_key) for ep in self.endpoints],
                            needs=DEV_MODE_ENDPOINTS if cfg.dev_mode else (), timeout_s=t.health_s)
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
            stream=self.pool_cfg.stream, extra_body=dict(self.engine_cfg.extra_body),
            stream_min_tokens=self.pool_cfg.stream_min_tokens)

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
            if self._require().restart(index, reason):
                self._given_up.discard(index)
        if (not self._given_up and self._supervisor is not None and self.provider is not None
                and self.provider.can_grow(len(self._clients))):
            self._supervisor.spawn("growth", self._grow(reason))  # a failure is logged; the pool stays as it is

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
        changed = dispatcher.weight_version != 0  # its weights are unknown: out until refit
        index = dispatcher.add_client(client, self.limits, stale=changed)
        if changed:
            await self._ops.refit_stale([client.name], reraise=True)
        return index

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)

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

    def reset_stats(self) -> None:
        self._require().reset_stats()

    @property
    def queued(self) -> int:
        """Requests (or pieces of split groups) waiting for admission."""
        return self._require().ledger.queue.size

    @property
    def cap_changes(self) -> int:
        return self.monitor.cap_changes if self.monitor is not None else 0

    @property
    def observations(self) -> int:
        """Controller rounds in which some engine's /metrics answered."""
        return self.monitor.observed if self.monitor is not None else 0

    @property
    def affinity_moves(self) -> int:
        """Requests sent away from their affinity key's engine (the imbalance gate opened)."""
        return self._require().affinity.moved

    def end_session(self, key: str) -> bool:
        """Session (or any affinity key) ``key`` is over: its home engine is forgotten now rather than at
        ``pool.affinity_ttl_s`` or when ``pool.affinity_max_keys`` pushes it out. Its turns still running finish
        where they are. False if the key had no home (never placed, expired, evicted or ended before)."""
        return self._require().affinity.end(key)

    def clear_affinity(self) -> int:
        """Forget every affinity key's home (verl's ``clear_sticky_cache``): the next requests go where load
        says. Returns how many homes were forgotten."""
        return self._require().affinity.clear()

    @property
    def affinity_keys(self) -> int:
        """Affinity keys with a home now (at most ``pool.affinity_max_keys``)."""
        return len(self._require().affinity)

    def retire_engine(self, name: str, reason: str) -> None:
        """Take engine ``name`` out of rotation for good; what runs there finishes there. A name that joined
        again after it was retired (verl's hybrid replicas, at every weight sync) means its newest engine."""
        names = self.engine_names
        if name not in names:
            raise PoolError(f"retire_engine: no engine named {name!r} (engines: {', '.join(names)})")
        self._require().retire(len(names) - 1 - names[::-1].index(name), reason)

    def observe_metrics(self, texts: dict[str, str], now: float | None = None) -> None:
        """One controller step from these engines' /metrics texts (by engine name; others saw nothing)."""
        from rollout_plugin.pool.observe.telemetry import EngineMetrics, parse_vllm_metrics

        if self.monitor is not None:
            self.monitor.observe([parse_vllm_metrics(texts[n]) if n in texts else EngineMetrics()
                                  for n in self.engine_names], now=now)

    @property
    def engine_names(self) -> list[str]:
        return [c.name for c in self._clients]
