"""A concurrency-managed router that implements verl 0.9's ``RequestLoadBalancer`` protocol.

verl builds it from ``actor_rollout_ref.rollout.router_config_path`` (a YAML naming ``router_class``)
as ``Cls(servers, yaml_config)`` inside one Ray actor shared by every agent-loop worker; each sample's
``generate`` first awaits ``acquire_server`` and releases the server when it finishes.

verl's default router admits everything at once (least in-flight by request count, no cap). This one
admits a request only where a server has room under its cap — Xtuner's per-engine cap from the
server's own ``max_num_seqs`` × the over-concurrency ratio, adapted from the server's ``/metrics`` by
the pool's controller when ``controller.mode=adaptive`` — and keeps GRPO groups and multi-turn
sessions together (:mod:`.admission`). A request that finds no room waits in a FIFO queue.

verl 0.9.1's ``LLMServerClient`` does not retry a failed ``acquire_server`` (only
``FullyAsyncLLMServerClient`` with ``only_hybrid`` retries, and only on "No available servers in load
balancer"), so refusing outright would fail the step. The nearest real behaviour: wait, bounded by
``admission_timeout_s`` and ``max_waiting``; past either the router refuses with that message.

Plain Python: :mod:`.actor` wraps it as the Ray actor verl instantiates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from rollout_plugin.adapters.verl.admission import Choice, ServerLoad, choose, server_cap
from rollout_plugin.config.schema import ControllerConfig, ControllerMode
from rollout_plugin.config.validate import Problems, nearest_key
from rollout_plugin.errors import ConfigProblem
from rollout_plugin.pool.control import ControlState, Observation, initial_state, step
from rollout_plugin.pool.telemetry import parse_vllm_metrics

log = logging.getLogger(__name__)

# verl's client retries this (FullyAsyncLLMServerClient, only_hybrid) and users grep for it.
NO_SERVER = "No available servers in load balancer"
SETTINGS_KEY = "rollout_pool"  # where router settings sit in actor_rollout_ref.rollout.custom


@dataclass(frozen=True)
class RouterSettings:
    """The router's YAML keys (besides ``router_class``); ``rollout.custom.rollout_pool`` overrides them."""

    imbalance: float = 0.25  # a group stays on its server while ≤ this load fraction above the least loaded
    over_concurrency_ratio: float = 1.2
    per_engine: Optional[int] = None  # unset: the server's max_num_seqs (Xtuner preset by length if unknown)
    group_size: Optional[int] = None  # unset: the server's rollout.n
    admission_timeout_s: float = 1800.0
    max_waiting: int = 32768  # requests queued in the router; beyond this acquire refuses at once
    cache_size: int = 10000  # sessions and group homes remembered (LRU), like verl's default router
    metrics_url: str = "http://{server}/metrics"
    metrics_timeout_s: float = 2.0
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
    p.at_least("router.controller.interval_s", settings.controller.interval_s, 0.05)
    p.raise_if_any()
    return settings


@dataclass
class _Waiter:
    request_id: str
    group: Optional[int]
    future: asyncio.Future


def _field(cfg: Any, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


async def _call(method: Any, *args: Any) -> Any:
    result = method.remote(*args)
    return await result if inspect.isawaitable(result) else result


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key: Any, value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class PoolRouter:
    """verl's ``RequestLoadBalancer`` protocol with per-server caps, group affinity and a bounded queue."""

    def __init__(self, servers: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None):
        self._yaml = dict(config or {})
        self.settings = parse_settings(self._yaml)
        self._handles: dict[str, Any] = {}
        self._inflight: dict[str, int] = {}
        self._caps: dict[str, int] = {}
        self._states: dict[str, ControlState] = {}
        self._completed: dict[str, int] = {}
        self._sessions = _LRU(self.settings.cache_size)
        self._homes = _LRU(self.settings.cache_size)
        self._admitted: dict[str, tuple[str, Optional[int]]] = {}  # request id -> (server, group) in flight
        self._on_home: dict[int, int] = {}  # group -> its samples in flight on its home server
        self._queue: deque[_Waiter] = deque()
        self._group_size = self.settings.group_size or 1
        self._configured = False
        self._config_lock: Optional[asyncio.Lock] = None
        self._monitor: Optional[asyncio.Task] = None
        self.counters: dict[str, int] = {"admitted": 0, "waited": 0, "refused": 0, "session moved": 0,
                                         "group split": 0, "cap changes": 0, "observed": 0}
        self._add(servers)

    # --- verl's protocol ---------------------------------------------------------------------------
    async def acquire_server(self, request_id: str, prompt_ids: Any = None, **_: Any) -> tuple[str, Any]:
        await self._ensure_configured()
        group = hash(tuple(int(t) for t in prompt_ids)) if prompt_ids is not None else None
        if not self._handles:
            raise RuntimeError(NO_SERVER)
        if not self._queue:
            choice = self._choose(request_id, group)
            if choice is not None:
                return self._book(choice, request_id, group)
        if len(self._queue) >= self.settings.max_waiting:
            self.counters["refused"] += 1
            raise RuntimeError(f"{NO_SERVER}: {len(self._queue)} requests already wait for a server "
                               f"(router.max_waiting={self.settings.max_waiting})")
        waiter = _Waiter(request_id, group, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.counters["waited"] += 1
        self._pump()
        try:
            server_id = await asyncio.wait_for(asyncio.shield(waiter.future), self.settings.admission_timeout_s)
        except TimeoutError:
            if waiter.future.done():  # admitted in the same instant the wait ran out
                return self._handle(waiter.future.result())
            waiter.future.cancel()
            self.counters["refused"] += 1
            raise RuntimeError(f"{NO_SERVER}: every server stayed at its cap for "
                               f"{self.settings.admission_timeout_s:g} s (router.admission_timeout_s); "
                               f"caps {self._caps}, in flight {self._inflight}") from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._unbook(waiter.future.result(), request_id)
            else:
                waiter.future.cancel()
            raise
        return self._handle(server_id)

    async def release_server(self, server_id: str, request_id: Optional[str] = None) -> None:
        if self._inflight.get(server_id, 0) > 0:
            self._completed[server_id] += 1
        self._unbook(server_id, request_id)

    async def require_acquire_fields(self) -> list[str]:
        return ["prompt_ids"]  # the group key: the n samples of a GRPO group share one prompt

    async def require_release_fields(self) -> list[str]:
        return ["request_id"]  # which group a finished sample belonged to (the affinity gate counts them)

    async def add_servers(self, servers: dict[str, Any]) -> None:
        self._add(servers)
        self._configured = False  # the new servers' caps are read on the next acquire
        log.info("servers: +%d -> %d", len(servers), len(self._handles))

    async def remove_servers(self, server_ids: list[str]) -> None:
        for sid in server_ids:
            for table in (self._handles, self._inflight, self._caps, self._states, self._completed):
                table.pop(sid, None)
        log.info("servers: -%d -> %d", len(server_ids), len(self._handles))

    async def get_all_servers(self) -> list[str]:
        return list(self._handles)

    async def get_status(self) -> dict:
        return {"servers": dict(self._inflight), "caps": dict(self._caps), "total_inflight": sum(self._inflight.values()),
                "active_servers": len(self._handles), "registered_handles": list(self._handles),
                "waiting": sum(1 for w in self._queue if not w.future.done()), "counters": dict(self.counters)}

    async def clear_sticky_cache(self) -> dict:
        cleared = len(self._sessions) + len(self._homes)
        self._sessions.clear()
        self._homes.clear()
        return {"cleared_entries": cleared, "server_loads": dict(self._inflight)}

    async def get_total_inflight(self) -> int:
        return sum(self._inflight.values())

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None

    # --- admission --------------------------------------------------------------------------------
    def _loads(self) -> list[ServerLoad]:
        return [ServerLoad(sid, self._inflight[sid], self._caps.get(sid, 0)) for sid in self._handles]

    def _choose(self, request_id: str, group: Optional[int]) -> Optional[Choice]:
        return choose(self._loads(), session=self._sessions.get(request_id),
                      group_home=self._homes.get(group) if group is not None else None,
                      group_on_home=self._on_home.get(group, 0) if group is not None else 0,
                      imbalance=self.settings.imbalance)

    def _book(self, choice: Choice, request_id: str, group: Optional[int]) -> tuple[str, Any]:
        sid = choice.server_id
        self._inflight[sid] += 1
        self._sessions.put(request_id, sid)
        self._admitted[request_id] = (sid, group)
        if group is not None and choice.reason != "group split":  # a split-off sample leaves the home as is
            self._homes.put(group, sid)
            self._on_home[group] = self._on_home.get(group, 0) + 1
        self.counters["admitted"] += 1
        if choice.reason in self.counters:
            self.counters[choice.reason] += 1
        return self._handle(sid)

    def _handle(self, server_id: str) -> tuple[str, Any]:
        if server_id not in self._handles:  # removed while this request waited to be woken
            raise RuntimeError(f"{NO_SERVER}: server {server_id} was removed")
        return server_id, self._handles[server_id]

    def _unbook(self, server_id: str, request_id: Optional[str] = None) -> None:
        if self._inflight.get(server_id, 0) > 0:
            self._inflight[server_id] -= 1
        sid, group = self._admitted.pop(request_id, (None, None)) if request_id is not None else (None, None)
        if group is not None and sid == server_id and self._homes.get(group) == sid and group in self._on_home:
            self._on_home[group] -= 1
            if self._on_home[group] <= 0:
                del self._on_home[group]
        self._pump()

    def _pump(self) -> None:
        """Admit waiters in arrival order while some server has room.

        A waiter held for its group's (full) server is passed over, not waited behind: the next one
        may take the free slot. Stops as soon as every server is at its cap (the saturated case: one
        freed slot, one admission).
        """
        kept: deque[_Waiter] = deque()
        while self._queue:
            if all(load.room <= 0 for load in self._loads()):
                break
            waiter = self._queue.popleft()
            if waiter.future.done():  # timed out or cancelled
                continue
            choice = self._choose(waiter.request_id, waiter.group)
            if choice is None:
                kept.append(waiter)
                continue
            sid, _ = self._book(choice, waiter.request_id, waiter.group)
            waiter.future.set_result(sid)
        kept.extend(self._queue)
        self._queue = kept

    # --- servers, caps and the controller ------------------------------------------------------------
    def _add(self, servers: Mapping[str, Any]) -> None:
        for sid, handle in servers.items():
            self._handles[sid] = handle
            self._inflight.setdefault(sid, 0)
            self._completed.setdefault(sid, 0)

    async def _ensure_configured(self) -> None:
        if self._configured:
            return
        if self._config_lock is None:
            self._config_lock = asyncio.Lock()
        async with self._config_lock:
            if not self._configured:
                await self._configure([sid for sid in self._handles if sid not in self._caps])
                self._configured = True
        self._pump()

    async def _configure(self, new: list[str]) -> None:
        """Caps for new servers from their own rollout config (verl's ``get_rollout_config``)."""
        configs = await asyncio.gather(*(_call(self._handles[sid].get_rollout_config) for sid in new),
                                       return_exceptions=True)
        for sid, cfg in zip(new, configs):
            if isinstance(cfg, BaseException):
                log.warning("server %s: no rollout config (%s); using the router's settings", sid, cfg)
                cfg = {}
            custom = _field(cfg, "custom") or {}
            if isinstance(custom, Mapping) and custom.get(SETTINGS_KEY):
                self.settings = parse_settings(self._yaml, custom[SETTINGS_KEY])
            n = self.settings.group_size or _field(cfg, "n") or 1
            self._group_size = max(self._group_size, int(n))
            length = _field(cfg, "max_model_len") or ((_field(cfg, "prompt_length") or 0) +
                                                      (_field(cfg, "response_length") or 0)) or 4096
            cap = server_cap(max_num_seqs=_field(cfg, "max_num_seqs"), max_model_len=int(length),
                             group_size=int(n), servers=len(self._handles),
                             ratio=self.settings.over_concurrency_ratio, per_engine=self.settings.per_engine)
            self._states[sid] = initial_state(cap, self.settings.controller, int(n))
            self._caps[sid] = self._states[sid].cap
            log.info("server %s: cap None -> %d (max_num_seqs %s × ratio %g, group %d)", sid, self._caps[sid],
                     _field(cfg, "max_num_seqs"), self.settings.over_concurrency_ratio, int(n))
        if self.settings.controller.mode == ControllerMode.adaptive and self._monitor is None and self._handles:
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="rollout-pool-router-monitor")

    async def _watch(self) -> None:
        """Scrape each server's /metrics every interval and let the pool's controller move its cap."""
        import httpx  # the router actor runs where verl runs; httpx is only needed when adaptive

        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=self.settings.metrics_timeout_s) as client:
            while True:
                await asyncio.sleep(self.settings.controller.interval_s)  # the polling period, not a sync
                sids = list(self._states)
                texts = await asyncio.gather(*(self._scrape(client, sid) for sid in sids))
                self.observe({sid: text for sid, text in zip(sids, texts) if text is not None}, loop.time())

    async def _scrape(self, client: Any, sid: str) -> Optional[str]:
        try:
            response = await client.get(self.settings.metrics_url.format(server=sid))
            response.raise_for_status()
            return response.text
        except Exception as exc:  # a server without /metrics keeps its cap (the controller holds)
            log.debug("server %s: /metrics unavailable (%s)", sid, exc)
            return None

    def observe(self, texts: Mapping[str, str], now: float) -> None:
        """One controller step per server from its /metrics text (public so tests can drive it)."""
        backlog = sum(1 for w in self._queue if not w.future.done())
        for sid, text in texts.items():
            if sid not in self._states:
                continue
            m = parse_vllm_metrics(text)
            tokens = m.generation_tokens_total if m.generation_tokens_total is not None else float(self._completed[sid])
            obs = Observation(t=now, inflight=self._inflight[sid], backlog=backlog, tokens_total=tokens,
                              running=m.running, waiting=m.waiting, kv_usage=m.kv_usage,
                              preemptions_total=m.preemptions_total)
            self._states[sid], decision = step(self._states[sid], obs, self.settings.controller)
            self.counters["observed"] += 1
            if decision.changed:
                self._caps[sid] = decision.cap
                self.counters["cap changes"] += 1
                log.info("server %s: cap %d -> %d (%s)", sid, decision.old, decision.cap, decision.reason)
        self._pump()
