"""Where launched engines come from: processes on this machine, or Ray actors across a cluster.

The pool asks a provider for ``pool.engines`` endpoints, for a replacement when one dies, and to
stop everything on exit; everything above the endpoint (HTTP client, dispatcher, controller) is the
same for every backend. :func:`~rollout_plugin.pool.engines.backends.make_provider` picks one by
``pool.backend``; the Ray backend (:mod:`~rollout_plugin.pool.engines.ray_backend`) builds on this seam.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Optional, Protocol

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.errors import ConfigError, EngineError
from rollout_plugin.pool.engines.launcher import EngineEndpoint, EngineProcess, cpu_binding, engine_cores, reserve_ports, stop_all
from rollout_plugin.pool.engines.placement import GpuInventory, Placement, gpu_inventory, place_engines

log = logging.getLogger(__name__)

# on_dead(index, reason): the engine at ``index`` is gone (the pool marks it dead, its work moves).
# on_capacity(reason): the cluster grew; engines the pool gave up on may get another try.
DeadHook = Callable[[int, str], None]
CapacityHook = Callable[[str], None]


class EngineProvider(Protocol):
    startup_s: list[float]

    async def start(self, count: int, max_num_seqs: int) -> list[EngineEndpoint]:
        """Launch ``count`` engines and wait until each answers; raise :class:`EngineError` if one cannot."""

    async def replace(self, index: int) -> EngineEndpoint:
        """Stop what is left of engine ``index`` and launch its replacement; raise :class:`EngineError`."""

    async def watch(self, on_dead: DeadHook, on_capacity: CapacityHook) -> None:
        """Report deaths and new capacity until cancelled (return at once if the backend has nothing to watch)."""

    def can_grow(self, engines: int) -> bool:
        """Whether :meth:`add` may launch one more engine now that the pool has ``engines``."""

    async def add(self) -> EngineEndpoint:
        """Launch one more engine at the next index; raise :class:`EngineError` if it cannot."""

    def close(self) -> None:
        """Stop every engine this provider launched (blocking; safe to call twice)."""


async def first_engine_error(waits: list[Coroutine[object, object, float]]) -> list[float]:
    """Await all; one failing cancels the others, and the :class:`EngineError` (not the group) is raised."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(w) for w in waits]
    except BaseExceptionGroup as group:
        failed = group.subgroup(lambda e: isinstance(e, EngineError))
        if failed is None:
            raise
        while isinstance(failed, BaseExceptionGroup):
            failed = failed.exceptions[0]
        raise failed from None
    return [t.result() for t in tasks]


class LocalEngines:
    """``pool.backend=local``: vLLM server child processes on this machine, each on its own cores and GPUs."""

    def __init__(self, cfg: EngineConfig, inventory: Optional[GpuInventory] = None):
        self.cfg = cfg
        self.processes: list[EngineProcess] = []
        self.startup_s: list[float] = []
        self.placement: Optional[Placement] = None
        self._inventory = inventory  # None: read this machine's (tests pass a fake one)
        self._model = cfg.model
        self._max_num_seqs = 0

    async def start(self, count: int, max_num_seqs: int) -> list[EngineEndpoint]:
        from rollout_plugin.model.embedded import resolve_model

        self._model = await asyncio.to_thread(resolve_model, self.cfg.model, self.cfg.python)
        inventory = self._inventory or await asyncio.to_thread(gpu_inventory)
        # Refused here, before any engine starts: too few GPUs, overlap with the trainer's, TP not dividing.
        self.placement = place_engines(inventory, self.cfg, count,
                                       colocated_utilization=_colocated_utilization(self.cfg, self._model, inventory))
        log.info("placement: %s", self.placement.summary)
        if _trainer_here_undeclared(self.cfg, inventory):
            log.warning("this process already uses CUDA (a trainer?) but engine.trainer_devices is unset: engines "
                        "may land on its GPU; list the trainer's GPUs in engine.trainer_devices (or set "
                        "engine.colocate=true to share them on purpose)")
        cfg = self.cfg = dataclasses.replace(self.cfg, gpu_memory_utilization=self.placement.gpu_memory_utilization)
        self._max_num_seqs = max_num_seqs
        ports = reserve_ports(cfg.host, cfg.port, count)
        cores = engine_cores()
        self.processes = [
            EngineProcess(i, cfg, model=self._model, port=ports[i], max_num_seqs=max_num_seqs,
                          cpu_bind=cpu_binding(i, count, cores), log_dir=Path(cfg.log_dir),
                          devices=self.placement.devices[i])
            for i in range(count)
        ]
        for proc in self.processes:
            proc.start()  # from this (the loop's) thread: PR_SET_PDEATHSIG follows the launching thread
        self.startup_s = await first_engine_error([p.wait_ready() for p in self.processes])
        return [p.endpoint() for p in self.processes]

    async def replace(self, index: int) -> EngineEndpoint:
        old = self.processes[index]
        await asyncio.to_thread(old.stop)
        cfg = self.cfg
        fresh = EngineProcess(index, cfg, model=self._model, port=reserve_ports(cfg.host, 0, 1)[0],
                              max_num_seqs=self._max_num_seqs, cpu_bind=old.cpu_bind, log_dir=Path(cfg.log_dir),
                              devices=old.devices)  # the same GPUs: the dead engine's are free again
        self.processes[index] = fresh
        try:
            fresh.start()  # on the loop's thread, like the first launch (PR_SET_PDEATHSIG)
            await fresh.wait_ready()
        except BaseException:
            fresh.stop()
            raise
        return fresh.endpoint()

    async def watch(self, on_dead: DeadHook, on_capacity: CapacityHook) -> None:
        """Nothing to watch: a dead local engine shows up as failed calls and a failed health probe."""

    def can_grow(self, engines: int) -> bool:
        return False  # one machine: its cores were split between pool.engines at start

    async def add(self) -> EngineEndpoint:
        raise EngineError("the local backend does not add engines at runtime (pool.engines is fixed)")

    def close(self) -> None:
        stop_all(self.processes)


def _trainer_here_undeclared(cfg: EngineConfig, inventory: GpuInventory) -> bool:
    """CUDA is already initialized in this process (torch imported by the caller, never by us) and no
    trainer GPUs were declared: the usual way engines end up next to the trainer on cuda:0."""
    torch = sys.modules.get("torch")
    if cfg.trainer_devices or cfg.colocate or not inventory.devices or torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # a torch without CUDA support, or a stub
        return False


def _colocated_utilization(cfg: EngineConfig, model: str, inventory: GpuInventory) -> Optional[float]:
    """The planner's share of each GPU for an engine next to the trainer (engine.colocate, utilization unset)."""
    if not (cfg.colocate and cfg.gpu_memory_utilization is None and inventory.devices and inventory.memory_gib):
        return None
    from rollout_plugin.tuning import HardwareSpec, colocated_utilization, load_hf_config

    try:
        spec = load_hf_config(model)
    except ConfigError:  # a hub id with no local config.json: place_engines asks for the value instead
        return None
    hardware = HardwareSpec("local", inventory.memory_gib, gpus_per_node=len(inventory.devices))
    train_gpus = len(cfg.trainer_devices) or len(inventory.devices)
    # Offload unknown here: plan as if the training state stays on the GPU (the smaller, safe fraction).
    util, why = colocated_utilization(spec, hardware, train_gpus, offload=False)
    log.info("engine.gpu_memory_utilization unset, colocated: %s (%s)", util, why)
    return util
