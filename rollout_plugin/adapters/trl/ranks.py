"""One rollout pool per ``accelerate launch`` job, and the collectives every other rank goes through.

TRL runs one process per GPU. The pool (and its engines) lives on the main process only:
:func:`make_pool` starts it there and gives the other ranks ``None``. Those ranks reach it through
two collectives, the way TRL's own vLLM server mode does:

* :func:`share_groups` — every rank's prompts gathered to the main process, each distinct prompt
  generated once as a group, the completions broadcast and each rank handed back its own slice;
* :func:`on_main` / :func:`everyone` — something done on the main process (a weight sync, a
  generation) or on every rank, the main process's result on every rank; a failure on any rank fails
  every rank at once, instead of leaving the others waiting in their next collective.

Collectives are accelerate's ``gather_object`` / ``broadcast_object_list`` unless a
:class:`Collectives` is passed (the unit tests run several fake ranks on threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    from rollout_plugin.pool.pool import SyncRolloutPool

__all__ = ["Collectives", "everyone", "job_timeout_s", "make_pool", "on_main", "share_groups"]

log = logging.getLogger(__name__)

# transformers' TrainingArguments.ddp_timeout default; torch's own (10 minutes) is what a process group gets when
# PartialState() is made before GRPOConfig (the README's order) unless told.
DDP_TIMEOUT_S = 1800.0
COLLECTIVE_MARGIN_S = 300.0  # beyond the longest wait of rank 0 alone (engine start, a drain)

T = TypeVar("T")


@dataclass(frozen=True)
class Collectives:
    """The two collectives the TRL adapter needs; every rank calls each one, in the same order."""

    gather: Callable[[list], list]  # every rank's list, concatenated in rank order, on every rank
    broadcast: Callable[[Any], Any]  # the main process's object, on every rank


def accelerate_collectives() -> Collectives:
    from accelerate.utils import broadcast_object_list, gather_object

    return Collectives(gather=gather_object, broadcast=lambda obj: broadcast_object_list([obj], from_process=0)[0])


def everyone(accelerator: Any, fn: Callable[[], T], collectives: Collectives | None = None) -> T:
    """``fn()`` on every rank; returns the main process's result (sent to every rank: picklable) on all of them.

    Every rank learns every rank's failure: its own is raised as it was, another rank's as a
    :class:`TrainerAdapterError` naming that rank — no rank is left waiting in a collective the failed
    one will never join."""
    coll = collectives or accelerate_collectives()
    error: BaseException | None = None
    value: Any = None
    try:
        value = fn()
    except Exception as exc:  # shared below, then raised: every rank fails the same step
        error = exc
    mine = (value if accelerator.is_main_process else None,
            None if error is None else f"{type(error).__name__}: {error}")
    outcomes = coll.gather([mine])  # one per rank, in rank order
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, message) in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        who = "the main process (rank 0)" if rank == 0 else f"rank {rank}"
        raise TrainerAdapterError(f"{who} failed: {message}")
    return outcomes[0][0]


def on_main(accelerator: Any, fn: Callable[[], T], collectives: Collectives | None = None) -> T:
    """``fn()`` on the main process only; its result (or its failure) on every rank."""
    return everyone(accelerator, lambda: fn() if accelerator.is_main_process else None, collectives)


def share_groups(accelerator: Any, prompts: Sequence[Any], k: int,
                 generate: Callable[[list], Sequence[list]],
                 collectives: Collectives | None = None) -> tuple[list, list[list]]:
    """TRL's gather → group → broadcast → slice, for each prompt repeated ``k`` times in a row (across ranks).

    ``generate(unique)`` runs on the main process with the distinct prompts of every rank (rank order)
    and returns per-completion columns (``k`` entries per prompt, in group order: token ids,
    logprobs, ...). Returns this rank's prompts and its slice of each column."""
    coll = collectives or accelerate_collectives()
    every = coll.gather(list(prompts))  # a group may span ranks (TRL only asks the global batch to hold whole groups)

    def main() -> tuple[list, list[list]]:
        if len(every) % k:
            raise TrainerAdapterError(f"got {len(every)} prompts from all ranks, not a multiple of "
                                      f"num_generations={k}")
        unique = every[::k]
        columns = [list(c) for c in generate(unique)]
        for c in columns:
            if len(c) != len(unique) * k:
                raise TrainerAdapterError(f"the pool returned {len(c)} completions for {len(unique)} prompts "
                                          f"× num_generations={k}")
        return unique, columns

    unique, columns = on_main(accelerator, main, coll)
    mine = slice(accelerator.process_index * len(prompts), (accelerator.process_index + 1) * len(prompts))
    prompt_ids = [p for p in unique for _ in range(k)]
    return prompt_ids[mine], [c[mine] for c in columns]


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

    Engines stay off the training ranks' GPUs (:func:`~rollout_plugin.pool.placement.keep_off_training_gpus`)
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
    from rollout_plugin.pool.placement import gpu_inventory, keep_off_training_gpus

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
