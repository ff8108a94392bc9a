"""``pool.backend=ray``: each engine is a Ray actor that runs the same vLLM server the local launcher runs.

One placement group per replica (its bundle: ``ray.num_cpus``, ``num_gpus`` = tensor_parallel_size on GPU
clusters, custom resources for node affinity), so a replica is placed, lost and replaced on its own.
The actor owns one :class:`EngineProcess` on its node and reports the server's URL.

The data path does not go through Ray: the dispatcher, wherever the caller runs it (a driver, a named
actor), sends HTTP straight to each engine's URL. Routing requests through the actor would add a
queue in front of vLLM's own (the actor's ``max_concurrency``), copy every prompt and completion
through the object store, and make the pool's caps no longer the only thing that decides what waits.
Ray carries control calls only: start, ``lifetime`` (returns or raises when the engine is gone) and
stop; ``max_concurrency`` is sized for those, and the object store never holds more than an endpoint.

``ray`` is an optional extra, imported only here and only when this backend is used.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rollout_plugin.config.schema import EngineConfig, RayConfig, RayPlacement
from rollout_plugin.errors import EngineError, EngineStartError
from rollout_plugin.pool.engines.launcher import EngineEndpoint, EngineProcess, reserve_ports
from rollout_plugin.pool.engines.provider import CapacityHook, DeadHook, first_engine_error

log = logging.getLogger(__name__)

NODE_AFFINITY_UNIT = 0.001  # a replica asks this much of its node's marker resource: affinity, not capacity
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node; ray.util.placement_group.NODE_ID_LABEL_KEY
# We join a cluster only to place engines and exchange endpoints; a cluster we start ourselves gets
# Ray's smallest object store rather than 30 % of the machine's memory.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024
UNAVAILABLE_RETRIES = 10  # ActorUnavailableError in a row (1 s apart) before a replica counts as dead
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EngineError("pool.backend='ray' needs Ray: pip install 'rollout-plugin[ray]' "
                          "(or use pool.backend=local)") from None
    return ray


def replica_bundle(cfg: RayConfig, index: int, num_gpus: float) -> dict[str, float]:
    """The resources one replica holds: its placement group's single bundle (also the actor's request)."""
    bundle = {"CPU": cfg.num_cpus, **cfg.resources}
    if num_gpus > 0:
        bundle["GPU"] = num_gpus
    if cfg.nodes:
        node = cfg.nodes[index % len(cfg.nodes)]
        bundle[node] = bundle.get(node, 0.0) + NODE_AFFINITY_UNIT
    return {k: v for k, v in bundle.items() if v > 0}


def spread_target(bundle: dict[str, float], nodes: list[dict[str, Any]], ours: dict[str, int]) -> str | None:
    """``ray.placement=spread``: the alive node that could hold ``bundle`` and holds fewest of our replicas."""
    fits = [n for n in nodes if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items())]
    if not fits:
        return None
    return min(fits, key=lambda n: (ours.get(n["NodeID"], 0), n["NodeID"]))["NodeID"]


def check_ray_gpus(name: str, gpu_ids: list[Any], visible: str | None, tp: int) -> None:
    """Log the GPUs Ray gave a replica; refuse one whose engine would not see exactly its own.

    Ray sets the actor's ``CUDA_VISIBLE_DEVICES`` to the GPUs of its bundle; the engine inherits it (the
    launcher sets no devices for Ray actors). CPU replicas (no GPU asked for) pass untouched.
    """
    log.info("%s (ray): GPUs %s, CUDA_VISIBLE_DEVICES=%s", name, list(gpu_ids) or "none",
             "unset" if visible is None else repr(visible))
    if not gpu_ids:
        return
    seen = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if len(gpu_ids) != tp:
        raise EngineError(f"{name} (ray): Ray gave this replica {len(gpu_ids)} GPU(s) {list(gpu_ids)} but "
                          f"engine.tensor_parallel_size={tp} needs {tp} (pool.ray.num_gpus)")
    if sorted(seen) != sorted(str(g) for g in gpu_ids):
        raise EngineError(f"{name} (ray): CUDA_VISIBLE_DEVICES={visible!r} is not this replica's GPUs "
                          f"{list(gpu_ids)}; something overrode Ray's (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES?)")


@functools.cache
def _remote_actor() -> Any:
    """The Ray actor class, made once per process (each ``ray.remote`` exports the class anew)."""
    return _ray().remote(EngineActor)


class EngineActor:
    """Runs inside a Ray worker on the engine's node and owns one vLLM server process there."""

    def __init__(self, index: int, cfg: EngineConfig, max_num_seqs: int):
        self.index, self.cfg, self.max_num_seqs = index, cfg, max_num_seqs
        self.proc: EngineProcess | None = None

    async def start(self) -> tuple[EngineEndpoint, float, str]:
        """Launch the server, wait until healthy; (endpoint, seconds to ready, node id)."""
        import ray

        from rollout_plugin.model.embedded import resolve_model

        cfg = self.cfg
        model = await asyncio.to_thread(resolve_model, cfg.model, cfg.python)  # this node's copy
        port = reserve_ports(cfg.host, cfg.port + self.index if cfg.port else 0, 1)[0]
        check_ray_gpus(f"engine{self.index}", ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                       cfg.tensor_parallel_size)
        # Ray already set this worker's GPU visibility (devices=None: the child inherits it). CPU engines: vLLM's "auto"
        # binding pins every engine on a machine to the same cores, and two engines' spinning OMP threads
        # on one core starve one of them (seen: 3 tok/s next to 4.9k); "nobind" leaves placement to the
        # OS, with Ray's OMP_NUM_THREADS (the replica's num_cpus). engine.env may still set a binding.
        self.proc = EngineProcess(self.index, cfg, model=model, port=port, max_num_seqs=self.max_num_seqs,
                                  cpu_bind="nobind", log_dir=Path(cfg.log_dir))
        # On the actor's event-loop thread, which lives as long as the actor: when the worker dies (its
        # node is lost, ray.kill) the kernel's PR_SET_PDEATHSIG takes the server down with it.
        self.proc.start()
        try:
            ready_s = await self.proc.wait_ready()
        except BaseException:
            await asyncio.to_thread(self.proc.stop)
            raise
        host = cfg.host if cfg.host not in _WILDCARD_HOSTS else ray.util.get_node_ip_address()
        ep = self.proc.endpoint()
        return (EngineEndpoint(ep.name, f"http://{host}:{port}", ep.api_key, ep.pid), ready_s,
                ray.get_runtime_context().get_node_id())

    async def lifetime(self) -> str:
        """Returns when the server exits (the caller also sees the actor's own death as an error)."""
        proc = self.proc.proc if self.proc else None
        if proc is None:
            return "engine not running"
        code = await asyncio.to_thread(proc.wait)
        return f"vLLM server exited with code {code}"

    async def stop(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.proc.stop)


@dataclass
class _Replica:
    index: int
    pg: Any = None
    actor: Any = None
    node_id: str | None = None
    lifetime: Any = None  # ObjectRef of EngineActor.lifetime
    endpoint: EngineEndpoint | None = None
    done: bool = False  # its death was reported, or it is being replaced


class RayEngines:
    """The Ray provider: one actor per replica, watched for death, replaced when resources allow."""

    def __init__(self, engine: EngineConfig, cfg: RayConfig):
        # Absolute, so an actor whose worker runs elsewhere (another cwd, another node) logs to one place.
        self.engine_cfg = replace(engine, log_dir=str(Path(engine.log_dir).resolve()))
        self.cfg = cfg
        self.startup_s: list[float] = []
        self._replicas: list[_Replica] = []
        self._joined: asyncio.Queue[_Replica] = asyncio.Queue()
        self._max_num_seqs = 0
        self._num_gpus = 0.0
        self._owns_ray = False
        self._closed = False

    # -- cluster ----------------------------------------------------------------------------------
    def _connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():  # the caller's cluster (verl's driver): share it, never shut it down
            return
        kwargs: dict[str, Any] = {"namespace": self.cfg.namespace, "include_dashboard": False}
        if self.cfg.address is None:
            kwargs["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
        ray.init(address=self.cfg.address, **kwargs)
        self._owns_ray = True
        log.info("ray: disconnected -> connected (%s, namespace %s)", self.cfg.address or "new local cluster",
                 self.cfg.namespace)

    def _gpus_per_replica(self) -> float:
        if self.cfg.num_gpus is not None:
            return self.cfg.num_gpus
        has_gpus = _ray().cluster_resources().get("GPU", 0) > 0
        return float(self.engine_cfg.tensor_parallel_size) if has_gpus else 0.0

    # -- provider ---------------------------------------------------------------------------------
    async def start(self, count: int, max_num_seqs: int) -> list[EngineEndpoint]:
        await asyncio.to_thread(self._connect)
        self._max_num_seqs = max_num_seqs
        self._num_gpus = self._gpus_per_replica()
        self._replicas = [_Replica(i) for i in range(count)]
        timeout = self.cfg.replace_timeout_s + self.engine_cfg.startup_timeout_s
        results = await first_engine_error([self._launch(r, timeout) for r in self._replicas])
        self.startup_s = list(results)
        return [r.endpoint for r in self._replicas]

    async def replace(self, index: int) -> EngineEndpoint:
        old = self._replicas[index]
        old.done = True
        await asyncio.to_thread(self._release, old)
        fresh = self._replicas[index] = _Replica(index)
        await self._launch(fresh, self.cfg.replace_timeout_s + self.engine_cfg.startup_timeout_s)
        return fresh.endpoint

    def can_grow(self, engines: int) -> bool:
        """Room for one more replica under ``pool.ray.max_engines`` (and none being added now)."""
        limit = self.cfg.max_engines
        return limit is not None and engines < limit and len(self._replicas) == engines and not self._closed

    async def add(self) -> EngineEndpoint:
        """Launch one more replica (a node joined); it gets the next index."""
        replica = _Replica(len(self._replicas))
        self._replicas.append(replica)
        try:
            await self._launch(replica, self.cfg.replace_timeout_s + self.engine_cfg.startup_timeout_s)
        except BaseException:
            self._replicas.remove(replica)
            raise
        return replica.endpoint

    async def _launch(self, replica: _Replica, timeout_s: float) -> float:
        """Placement group, then actor, then server; everything created is released on failure."""
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = replica_bundle(self.cfg, replica.index, self._num_gpus)
        selector = None
        if self.cfg.placement == RayPlacement.spread:
            nodes = await asyncio.to_thread(ray.nodes)
            ours: dict[str, int] = {}  # counted after the await, with no await until this replica is counted
            for r in self._replicas:
                if r.node_id and not r.done:
                    ours[r.node_id] = ours.get(r.node_id, 0) + 1
            target = spread_target(bundle, nodes, ours)
            selector = [{NODE_ID_LABEL: target}] if target else None
            replica.node_id = target  # counted at once: replicas launched together must not pick the same node
        name = f"engine{replica.index}"
        try:
            replica.pg = placement_group([bundle], strategy="STRICT_PACK", bundle_label_selector=selector)
            try:
                await asyncio.wait_for(replica.pg.ready(), self.cfg.replace_timeout_s)
            except TimeoutError:
                raise EngineError(f"{name}: no node has {bundle} free after {self.cfg.replace_timeout_s:.0f}s "
                                  f"(pool.ray.replace_timeout_s; pool.ray.nodes/resources pin replicas)") from None
            replica.actor = _remote_actor().options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(replica.pg, placement_group_bundle_index=0),
                max_concurrency=self.cfg.max_concurrency,
                max_restarts=0,  # the pool replaces a dead engine itself: a new URL it must know about
            ).remote(replica.index, self.engine_cfg, self._max_num_seqs)
            try:
                endpoint, ready_s, node_id = await asyncio.wait_for(replica.actor.start.remote(), timeout_s)
            except TimeoutError:
                raise EngineError(f"{name}: not ready after {timeout_s:.0f}s (engine.startup_timeout_s)") from None
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                if isinstance(cause, EngineError):
                    raise EngineStartError(f"{name} (ray): {cause}") from None
                raise EngineError(f"{name} (ray): {cause}") from None
            except ray.exceptions.RayError as exc:
                raise EngineError(f"{name}: its Ray actor died while starting ({type(exc).__name__})") from None
        except BaseException:
            await asyncio.to_thread(self._release, replica)
            raise
        replica.endpoint, replica.node_id = endpoint, node_id
        replica.lifetime = replica.actor.lifetime.remote()
        self._joined.put_nowait(replica)
        log.info("%s: starting -> ready on node %s (%.1fs, %s)", name, node_id[:12], ready_s, endpoint.url)
        return ready_s

    async def watch(self, on_dead: DeadHook, on_capacity: CapacityHook) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_nodes(on_capacity))
            while True:  # replicas that became ready before watching began are already queued
                replica = await self._joined.get()
                tg.create_task(self._watch_replica(replica, on_dead))

    async def _watch_replica(self, replica: _Replica, on_dead: DeadHook) -> None:
        ray = _ray()
        unavailable = 0
        while True:
            try:
                reason = await replica.lifetime
            except ray.exceptions.ActorUnavailableError as exc:
                # Transient by Ray's own definition (e.g. while another node's raylet goes away): ask
                # again a few times before calling it a death; a dead actor answers ActorDiedError.
                unavailable += 1
                if unavailable <= UNAVAILABLE_RETRIES and not (replica.done or self._closed):
                    await asyncio.sleep(1.0)  # Ray has no event for "reachable again"
                    replica.lifetime = replica.actor.lifetime.remote()
                    continue
                reason = f"Ray actor lost ({type(exc).__name__} {unavailable} times)"
            except ray.exceptions.RayError as exc:  # the actor (or its node) is gone
                reason = f"Ray actor lost ({type(exc).__name__})"
            break
        if replica.done or self._closed:
            return
        replica.done = True
        log.warning("engine%d: ready -> dead on node %s (%s)", replica.index, (replica.node_id or "?")[:12], reason)
        on_dead(replica.index, reason)

    async def _watch_nodes(self, on_capacity: CapacityHook) -> None:
        """Nodes come and go; a new one may hold what a given-up replica was waiting for."""
        ray = _ray()
        alive = {n["NodeID"] for n in await asyncio.to_thread(ray.nodes) if n.get("Alive")}
        while True:
            await asyncio.sleep(self.cfg.node_poll_s)  # polling the cluster's membership: Ray has no async event
            now = {n["NodeID"] for n in await asyncio.to_thread(ray.nodes) if n.get("Alive")}
            for node in alive - now:
                log.warning("ray node %s: alive -> dead", node[:12])
            joined = now - alive
            alive = now
            for node in joined:
                log.info("ray node %s: absent -> alive", node[:12])
            if joined:
                on_capacity(f"{len(joined)} Ray node(s) joined")

    def _release(self, *replicas: _Replica) -> None:
        """Stop the servers (gracefully where the actor still answers), kill the actors, free their resources."""
        ray = _ray()
        from ray.util.placement_group import remove_placement_group

        live = [r for r in replicas if r.actor is not None]
        stops = [r.actor.stop.remote() for r in live]
        if stops:
            # A dead actor or lost node fails its stop at once, a wedged one times out; either way the
            # kill below ends the worker and PR_SET_PDEATHSIG the server with it.
            ray.wait(stops, num_returns=len(stops), timeout=30)
        for r in live:
            ray.kill(r.actor, no_restart=True)
            r.actor = None
        for r in replicas:
            if r.pg is not None:
                remove_placement_group(r.pg)
                r.pg = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        if not ray.is_initialized():
            return
        for replica in self._replicas:
            replica.done = True
        try:
            self._release(*self._replicas)
        finally:
            if self._owns_ray:
                ray.shutdown()
                log.info("ray: connected -> disconnected")
