"""A concurrency-managed router that implements verl 0.9's ``RequestLoadBalancer`` protocol.

verl builds it from ``actor_rollout_ref.rollout.router_config_path`` (a YAML naming ``router_class``)
as ``Cls(servers, yaml_config)`` inside one Ray actor shared by every agent-loop worker; each sample's
``generate`` first awaits ``acquire_server`` and releases the server when it finishes.

verl's default router admits everything at once (least in-flight by request count, no cap). This one
is the pool's own admission core (:class:`~rollout_plugin.pool.api.pool.RolloutPool`: the same ledger,
caps, affinity and controller feed as ``collect`` and the gateway) over *lease* engines: a verl
request is admitted where a server has room under its cap — Xtuner's per-engine cap from the
server's own ``max_num_seqs`` × the over-concurrency ratio, adapted from the server's ``/metrics`` by
the pool's controller when ``controller.mode=adaptive`` — and holds its lease until verl releases it.
GRPO groups and multi-turn sessions stay together (``Request.affinity``: a group's prompt, a session's
request id). A request that finds no room waits in the pool's queue, oldest first.

verl 0.9.1's ``LLMServerClient`` does not retry a failed ``acquire_server`` (only
``FullyAsyncLLMServerClient`` with ``only_hybrid`` retries, and only on "No available servers in load
balancer"), so refusing outright would fail the step. The nearest real behaviour: wait, bounded by
``admission_timeout_s`` and ``max_waiting``; past either the router refuses with that message.
A waiting acquire fails at once (RuntimeError, without that message: a retry cannot help) when the router
closes or its pool fails. A lease is verl's (request id, server) pair: ``release_server`` ends exactly that
one, and ``remove_servers`` ends the removed servers' leases (an acquire admitted there but not yet woken
waits for another server; verl's late release for the removed server finds nothing to end).

Plain Python: :mod:`.actor` wraps it as the Ray actor verl instantiates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from rollout_plugin.adapters.common.translate import group_key
from rollout_plugin.adapters.verl.admission import server_cap
from rollout_plugin.adapters.verl.leases import LEASE_PROMPT, Lease, LeaseClient, Leases
from rollout_plugin.config.schema import (
    ControllerConfig,
    ControllerMode,
    EngineConfig,
    GroupConfig,
    PoolConfig,
    TimeoutConfig,
)
from rollout_plugin.config.validate import Problems, nearest_key
from rollout_plugin.errors import ConfigProblem, PoolError
from rollout_plugin.pool import EngineEndpoint
from rollout_plugin.pool import RolloutPool
from rollout_plugin.types import Request

log = logging.getLogger(__name__)

# verl's client retries this (FullyAsyncLLMServerClient, only_hybrid) and users grep for it.
NO_SERVER = "No available servers in load balancer"
SETTINGS_KEY = "rollout_pool"  # where router settings sit in actor_rollout_ref.rollout.custom


@dataclass(frozen=True)
class RouterSettings:
    """The router's YAML keys (besides ``router_class``); ``rollout.custom.rollout_pool`` overrides them."""

    imbalance: float = 0.25  # a group stays on its server while ≤ this load fraction above the least loaded
    over_concurrency_ratio: float = 1.2  # requests in flight per server = its max_num_seqs × this
    per_engine: Optional[int] = None  # unset: the server's max_num_seqs (Xtuner preset by length if unknown)
    group_size: Optional[int] = None  # unset: the server's rollout.n
    admission_timeout_s: float = 1800.0
    max_waiting: int = 32768  # requests queued in the router; beyond this acquire refuses at once
    # Session and group homes remembered (the pool's affinity map: pool.affinity_max_keys), least recently
    # used dropped first, like verl's default router; verl never ends a session, so a home also expires
    # after cache_ttl_s unused (pool.affinity_ttl_s; null: never).
    cache_size: int = 10000
    cache_ttl_s: Optional[float] = 3600.0
    metrics_url: str = "http://{server}/metrics"  # each server's Prometheus text ({server}: verl's host:port id)
    metrics_timeout_s: float = 2.0  # a scrape slower than this is skipped (the server's cap holds)
    controller: ControllerConfig = field(default_factory=lambda: ControllerConfig(interval_s=2.0))


def parse_settings(*layers: Optional[Mapping[str, Any]]) -> RouterSettings:
    """Settings from the YAML dict and overrides (later layers win); every bad key reported at once."""
    merged: dict[str, Any] = {}
    controller: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key == "controller" and isinstance(value, Mapping):
                controller.update(value)
            elif key != "router_class":
                merged[key] = value
    p = Problems()
    names = [f.name for f in dataclasses.fields(RouterSettings) if f.name != "controller"]
    for key in list(merged):
        if key not in names:
            p.items.append(ConfigProblem(f"router.{key}", merged.pop(key), "unknown router setting",
                                         f"router.{nearest_key(key, names) or 'imbalance'}"))
    c_names = [f.name for f in dataclasses.fields(ControllerConfig)]
    for key in list(controller):
        if key not in c_names:
            p.items.append(ConfigProblem(f"router.controller.{key}", controller.pop(key),
                                         "unknown controller setting",
                                         f"router.controller.{nearest_key(key, c_names) or 'mode'}"))
    base = ControllerConfig(interval_s=2.0)
    if "mode" in controller:
        controller["mode"] = ControllerMode(str(controller["mode"]))
    settings = RouterSettings(**merged, controller=dataclasses.replace(base, **controller))
    p.at_least("router.over_concurrency_ratio", settings.over_concurrency_ratio, 1.0)
    p.at_least("router.imbalance", settings.imbalance, 0.0)
    p.at_least("router.admission_timeout_s", settings.admission_timeout_s, 0.001)
    p.at_least("router.max_waiting", settings.max_waiting, 0)
    p.at_least("router.per_engine", settings.per_engine, 1)
    p.at_least("router.cache_size", settings.cache_size, 1)
    if settings.cache_ttl_s is not None and not settings.cache_ttl_s > 0:
        p.add("router.cache_ttl_s", settings.cache_ttl_s, "must be > 0 seconds, or null for homes that never expire",
              3600.0)
    p.at_least("router.controller.interval_s", settings.controller.interval_s, 0.05)
    p.raise_if_any()
    return settings


def _field(cfg: Any, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


async def _call(method: Any, *args: Any) -> Any:
    result = method.remote(*args)
    return await result if inspect.isawaitable(result) else result


class PoolRouter:
    """verl's ``RequestLoadBalancer`` protocol over the pool's admission core (a pool of lease engines)."""

    def __init__(self, servers: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None):
        self._yaml = dict(config or {})
        self.settings = parse_settings(self._yaml)
        self._handles: dict[str, Any] = dict(servers)
        self._leases = Leases()
        self._pool: Optional[RolloutPool] = None
        self._start_lock: Optional[asyncio.Lock] = None
        self._closed = False
        self.counters: dict[str, int] = {"admitted": 0, "waited": 0, "refused": 0}

    # --- verl's protocol ---------------------------------------------------------------------------
    async def acquire_server(self, request_id: str, prompt_ids: Any = None, **_: Any) -> tuple[str, Any]:
        pool = await self._started()
        if pool.queued >= self.settings.max_waiting:
            self.counters["refused"] += 1
            raise RuntimeError(f"{NO_SERVER}: {pool.queued} requests already wait for a server "
                               f"(router.max_waiting={self.settings.max_waiting})")
        if pool.queued:
            self.counters["waited"] += 1
        deadline = asyncio.get_running_loop().time() + self.settings.admission_timeout_s
        affinity = self._affinity(request_id, prompt_ids)
        while True:
            lease = self._leases.open(request_id)
            try:
                lease.ticket = self._submit(pool, Request(lease.id, LEASE_PROMPT, affinity=affinity))
                server_id = await self._admitted(pool, lease, lease.ticket, deadline)
            except BaseException:  # refused, closed, failed, or the caller is gone: no slot stays held
                self._leases.drop(lease)
                raise
            if server_id in self._handles:
                break
            # Its server was removed (which ended the lease) before this acquire woke: wait for another.
            self._leases.drop(lease)
        self.counters["admitted"] += 1
        return server_id, self._handles[server_id]

    async def release_server(self, server_id: str, request_id: Optional[str] = None) -> None:
        lease = self._leases.release(request_id, server_id) if request_id is not None else None
        if lease is not None and lease.ticket is not None:
            await asyncio.wait([lease.ticket])  # the pool's books say the slot is free when this returns

    async def require_acquire_fields(self) -> list[str]:
        return ["prompt_ids"]  # the group key: the n samples of a GRPO group share one prompt

    async def require_release_fields(self) -> list[str]:
        return ["request_id"]  # which lease a finished sample held

    async def add_servers(self, servers: dict[str, Any]) -> None:
        new = {sid: h for sid, h in servers.items() if sid not in self._handles}
        self._handles.update(new)
        if self._pool is not None:
            for sid in new:
                await self._pool.add_engine(EngineEndpoint(sid, sid, None))
        log.info("servers: +%d -> %d", len(new), len(self._handles))

    async def remove_servers(self, server_ids: list[str]) -> None:
        """The servers leave: out of rotation, and their leases end now (verl aborts what ran there; its late
        release finds nothing to end). Acquires admitted there but not yet woken wait for another server."""
        ended = []
        for sid in server_ids:
            if self._handles.pop(sid, None) is not None and self._pool is not None:
                self._pool.retire_engine(sid, "removed by verl")
                ended += self._leases.end_server(sid)
        log.info("servers: -%d -> %d (%d lease(s) ended)", len(server_ids), len(self._handles), len(ended))
        tickets = [x.ticket for x in ended if x.ticket is not None]
        if tickets:
            await asyncio.wait(tickets)  # the pool's books say their slots are free when this returns

    async def get_all_servers(self) -> list[str]:
        return list(self._handles)

    async def get_status(self) -> dict:
        engines = self._pool.stats().engines if self._pool is not None else []
        live = [e for e in engines if e.name in self._handles]
        return {"servers": {e.name: e.inflight for e in live}, "caps": {e.name: e.cap for e in live},
                "total_inflight": sum(e.inflight for e in engines), "active_servers": len(self._handles),
                "registered_handles": list(self._handles),
                "waiting": self._pool.queued if self._pool is not None else 0,
                "counters": {**self.counters, "cap changes": self._pool.cap_changes if self._pool else 0,
                             "observed": self._pool.observations if self._pool else 0,
                             "group split": self._pool.affinity_moves if self._pool else 0}}

    async def clear_sticky_cache(self) -> dict:
        """Sessions and groups forget their servers (the pool's affinity map: the one copy), so the next
        acquires go where load says (verl calls this on phase switches and to rebalance)."""
        cleared = self._pool.clear_affinity() if self._pool is not None else 0
        status = await self.get_status()
        return {"cleared_entries": cleared, "server_loads": status["servers"]}

    async def get_total_inflight(self) -> int:
        return (await self.get_status())["total_inflight"]

    async def close(self) -> None:
        """Waiting acquires fail now (RuntimeError), leases end, the pool closes; later acquires refuse."""
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            self._leases.close()
            try:
                await pool.__aexit__(None, None, None)
            except PoolError as exc:  # already raised to every waiting acquire; closing still succeeds
                log.warning("router: closed after the pool failed (%s)", exc)

    def observe(self, texts: Mapping[str, str], now: float) -> None:
        """One controller step per server from its /metrics text (public so tests can drive it)."""
        if self._pool is not None:
            self._pool.observe_metrics({sid: text for sid, text in texts.items() if sid in self._handles}, now)

    # --- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _affinity(request_id: str, prompt_ids: Any) -> tuple[str, ...]:
        """The session first: verl reuses a session's request id for its next turn, whose prefix is on the server
        the pool remembers for it (until ended, evicted or expired); a first turn has no home there, so its
        group's prompt decides, and the session takes the server the turn went to."""
        session = f"session:{request_id}"
        return (session,) if prompt_ids is None else (session, group_key(prompt_ids))

    def _submit(self, pool: RolloutPool, request: Request) -> asyncio.Future[Any]:
        try:
            return pool.submit(request)
        except PoolError as exc:  # verl's protocol raises RuntimeError (not its retried NO_SERVER message)
            raise RuntimeError(f"rollout-plugin router: {exc}") from exc

    async def _admitted(self, pool: RolloutPool, lease: Lease, ticket: asyncio.Future[Any], deadline: float) -> str:
        """The server the pool admitted ``lease`` on; RuntimeError when the router closed, the pool failed
        (both at once: the pool resolves the lease's request, ``ticket``) or the admission timeout ran out."""
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        await asyncio.wait([lease.admitted, ticket], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if lease.admitted.done():
            return lease.admitted.result()
        if ticket.done() and not ticket.cancelled():
            exc = ticket.exception()
            why = (f"the pool failed: {exc}" if exc is not None else
                   "the router closed" if self._closed else f"the pool ended the request: {ticket.result().error}")
            raise RuntimeError(f"rollout-plugin router: {why} while request {lease.request_id} waited for a server")
        self.counters["refused"] += 1
        stats = pool.stats()
        raise RuntimeError(f"{NO_SERVER}: every server stayed at its cap for "
                           f"{self.settings.admission_timeout_s:g} s (router.admission_timeout_s); "
                           f"caps { {e.name: e.cap for e in stats.engines} }, "
                           f"in flight { {e.name: e.inflight for e in stats.engines} }")

    async def _started(self) -> RolloutPool:
        if self._pool is None and not self._closed:
            if self._start_lock is None:
                self._start_lock = asyncio.Lock()
            async with self._start_lock:
                if self._pool is None and not self._closed:
                    pool = await self._start_pool()
                    if self._closed:  # close() ran while it started: it must not outlive the router
                        await pool.__aexit__(None, None, None)
                    else:
                        self._pool = pool
        if self._closed or self._pool is None:
            raise RuntimeError("rollout-plugin router: closed (no server is handed out after close())")
        return self._pool

    async def _start_pool(self) -> RolloutPool:
        """Caps from the servers' own rollout config (verl's ``get_rollout_config``); without it, refuse."""
        sids = list(self._handles)
        configs = await asyncio.gather(*(_call(self._handles[sid].get_rollout_config) for sid in sids),
                                       return_exceptions=True)
        for sid, cfg in zip(sids, configs):
            if isinstance(cfg, BaseException) or cfg is None:
                raise RuntimeError(f"rollout-plugin router: server {sid} gave no rollout config "
                                   f"(get_rollout_config: {cfg!r}); the router sizes its caps from max_num_seqs and "
                                   f"the context length there, and will not guess (check the server actor)")
        cfg = configs[0]
        custom = _field(cfg, "custom") or {}
        if isinstance(custom, Mapping) and custom.get(SETTINGS_KEY):
            self.settings = parse_settings(self._yaml, custom[SETTINGS_KEY])
        s = self.settings
        n = int(s.group_size or _field(cfg, "n") or 1)
        length = _field(cfg, "max_model_len") or ((_field(cfg, "prompt_length") or 0) +
                                                  (_field(cfg, "response_length") or 0))
        if not length:
            raise RuntimeError(f"rollout-plugin router: server {sids[0]}'s rollout config has neither max_model_len "
                               f"nor prompt_length + response_length; set actor_rollout_ref.rollout.max_model_len")
        cap = server_cap(max_num_seqs=_field(cfg, "max_num_seqs"), max_model_len=int(length), group_size=n,
                         servers=len(sids), ratio=s.over_concurrency_ratio, per_engine=s.per_engine)
        pool = RolloutPool(
            EngineConfig(served_model_name="verl-server"),
            PoolConfig(per_engine=cap, over_concurrency_ratio=1.0, k=1, max_concurrent=1 << 30, pack_size=1,
                       max_retries=0, groups=GroupConfig(split_threshold=s.imbalance),
                       affinity_max_keys=s.cache_size, affinity_ttl_s=s.cache_ttl_s,
                       timeouts=TimeoutConfig(stall_s=float("inf"))),  # verl watches its servers, not us
            s.controller, clients=[LeaseClient(sid, self._leases, s.metrics_url, s.metrics_timeout_s) for sid in sids],
            client_factory=lambda name, url, **_: LeaseClient(name, self._leases, s.metrics_url, s.metrics_timeout_s))
        await pool.__aenter__()
        log.info("servers %s: cap None -> %d each (max_num_seqs %s × ratio %g, group %d)", ", ".join(sids), cap,
                 _field(cfg, "max_num_seqs"), s.over_concurrency_ratio, n)
        return pool
