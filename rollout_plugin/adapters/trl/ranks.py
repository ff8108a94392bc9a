"""One rollout pool per ``accelerate launch`` job.

TRL runs one process per GPU. The pool (and its engines) lives on the main process only:
:func:`make_pool` starts it there and gives the other ranks ``None``; they reach it through the
collectives of :mod:`rollout_plugin.adapters.common.ranks` (``share_groups``, ``on_main``, ``everyone``,
re-exported here), the way TRL's own vLLM server mode does.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.common.ranks import Collectives, everyone, on_main, share_groups

if TYPE_CHECKING:
    from rollout_plugin.pool import SyncRolloutPool

__all__ = ["Collectives", "everyone", "job_timeout_s", "make_pool", "on_main", "share_groups"]

log = logging.getLogger(__name__)

# transformers' TrainingArguments.ddp_timeout default; torch's own (10 minutes) is what a process group gets when
# PartialState() is made before GRPOConfig (the README's order) unless told.
DDP_TIMEOUT_S = 1800.0
COLLECTIVE_MARGIN_S = 300.0  # beyond the longest wait of rank 0 alone (engine start, a drain)


def job_timeout_s(engine: Any = None, pool: Any = None) -> float:
    """How long a rank may wait in a collective for the main process: engine start (``startup_timeout_s``) or a
    drain (one request, ``timeouts.request_s``) on rank 0 alone, plus a margin; at least TRL's ``ddp_timeout``."""
    from rollout_plugin.config.schema import EngineConfig, PoolConfig

    engine = engine if isinstance(engine, EngineConfig) else EngineConfig()
    pool = pool if isinstance(pool, PoolConfig) else PoolConfig()
    return max(DDP_TIMEOUT_S, engine.startup_timeout_s + COLLECTIVE_MARGIN_S,
               pool.timeouts.request_s + COLLECTIVE_MARGIN_S)


@contextlib.contextmanager
def make_pool(engine: Any = None, pool: Any = None, *, timeout_s: float | None = None,
              **kwargs: Any) -> Iterator[SyncRolloutPool | None]:
    """``with make_pool(EngineConfig(...), PoolConfig(...)) as pool:`` — a started :class:`SyncRolloutPool` on the
    main process of the job and ``None`` on every other rank; the same code under ``python`` and under
    ``accelerate launch --num_processes N``. A pool that fails to start fails every rank.

    Engines stay off the training ranks' GPUs (:func:`~rollout_plugin.pool.engines.placement.keep_off_training_gpus`)
    unless ``engine.colocate``; the job's process group waits ``timeout_s`` (default :func:`job_timeout_s`) in a
    collective, so the other ranks outlast engine start and drains on rank 0."""
    from datetime import timedelta

    from accelerate import PartialState

    from rollout_plugin.pool import SyncRolloutPool

    # Joins accelerate's process group when launched by it (one process otherwise). This is accelerate's shared
    # state, which the trainer's Accelerator reuses: on a machine without an accelerator it must be a CPU state,
    # or torchrun's ranks would each train alone (accelerate forms a CPU group only when asked for CPU).
    # Made here first (before GRPOConfig), it sets the group's timeout: torch's 10 minutes unless told.
    cpu = _cpu_only()
    timeout = timeout_s if timeout_s is not None else job_timeout_s(engine, pool)
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout))
    started: list[SyncRolloutPool] = []
    with contextlib.ExitStack() as stack:

        def start() -> None:
            if state.is_main_process:
                cfg = _engines_off_training_gpus(engine, 0 if cpu else _local_ranks())
                started.append(stack.enter_context(SyncRolloutPool(cfg, pool, **kwargs)))

        everyone(state, start)  # the other ranks wait here until the engines are up (or failed to start)
        yield started[0] if started else None


def _local_ranks() -> int:
    """Training ranks on this node (torchrun / accelerate set LOCAL_WORLD_SIZE; a plain ``python``: one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 1)


def _engines_off_training_gpus(engine: Any, local_ranks: int) -> Any:
    from rollout_plugin.config.schema import EngineConfig
    from rollout_plugin.pool import gpu_inventory, keep_off_training_gpus

    if local_ranks < 1 or not (engine is None or isinstance(engine, EngineConfig)):
        return engine
    cfg = engine or EngineConfig()
    if cfg.urls or cfg.colocate or cfg.trainer_devices:
        return engine
    return keep_off_training_gpus(cfg, gpu_inventory(), local_ranks)


def _cpu_only() -> bool:
    import torch
    from accelerate.utils import parse_flag_from_env

    current = getattr(getattr(torch, "accelerator", None), "current_accelerator", None)
    has_accelerator = current() is not None if current is not None else torch.cuda.is_available()
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator
