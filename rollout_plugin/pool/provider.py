"""Where launched engines come from: processes on this machine, or Ray actors across a cluster.

The pool asks a provider for ``pool.engines`` endpoints, for a replacement when one dies, and to
stop everything on exit; everything above the endpoint (HTTP client, dispatcher, controller) is the
same for every backend. :func:`make_provider` picks one by ``pool.backend``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Protocol

from rollout_plugin.config.schema import EngineConfig, PoolBackend, PoolConfig
from rollout_plugin.errors import EngineError
from rollout_plugin.pool.launcher import EngineEndpoint, EngineProcess, cpu_binding, engine_cores, reserve_ports, stop_all

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
    """``pool.backend=local``: vLLM server child processes on this machine, each on its own cores."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.processes: list[EngineProcess] = []
        self.startup_s: list[float] = []
        self._model = cfg.model
        self._max_num_seqs = 0

    async def start(self, count: int, max_num_seqs: int) -> list[EngineEndpoint]:
        from rollout_plugin.model.embedded import resolve_model

        cfg = self.cfg
        self._model = await asyncio.to_thread(resolve_model, cfg.model, cfg.python)
        self._max_num_seqs = max_num_seqs
        ports = reserve_ports(cfg.host, cfg.port, count)
        cores = engine_cores()
        self.processes = [
            EngineProcess(i, cfg, model=self._model, port=ports[i], max_num_seqs=max_num_seqs,
                          cpu_bind=cpu_binding(i, count, cores), log_dir=Path(cfg.log_dir))
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
                              max_num_seqs=self._max_num_seqs, cpu_bind=old.cpu_bind, log_dir=Path(cfg.log_dir))
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


def make_provider(engine: EngineConfig, pool: PoolConfig) -> EngineProvider:
    if pool.backend == PoolBackend.ray:
        from rollout_plugin.pool.ray_backend import RayEngines  # ray is an optional extra

        return RayEngines(engine, pool.ray)
    return LocalEngines(engine)
