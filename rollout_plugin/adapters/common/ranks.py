"""The collectives every rank of a multi-process trainer goes through to reach one pool on the main process.

A trainer runs one process per GPU; the pool (and its engines) lives on the main process only. The other
ranks reach it through two collectives, the way TRL's own vLLM server mode does:

* :func:`share_groups` — every rank's prompts gathered to the main process, each distinct prompt
  generated once as a group, the completions broadcast and each rank handed back its own slice;
* :func:`on_main` / :func:`everyone` — something done on the main process (a weight sync, a
  generation) or on every rank, the main process's result on every rank; a failure on any rank fails
  every rank at once, instead of leaving the others waiting in their next collective.

Trainer-neutral: ``accelerator`` is anything with ``is_main_process``, ``process_index`` and
``num_processes`` (accelerate's ``Accelerator`` / ``PartialState``, or a torch.distributed shim); the
collectives are accelerate's ``gather_object`` / ``broadcast_object_list`` unless a :class:`Collectives`
is passed (another launcher's, or the unit tests' fake ranks on threads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from rollout_plugin.errors import TrainerAdapterError

__all__ = ["Collectives", "accelerate_collectives", "check_one_pool", "everyone", "on_main", "share_groups"]

T = TypeVar("T")


@dataclass(frozen=True)
class Collectives:
    """The two collectives an adapter needs; every rank calls each one, in the same order."""

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


def check_one_pool(accelerator: Any, pool: Any) -> None:
    """One pool per job: on the main process, never on the other ranks (each would start its own engines)."""
    if pool is not None and not accelerator.is_main_process:
        raise TrainerAdapterError(
            f"a rollout pool on rank {accelerator.process_index} of {accelerator.num_processes}: every rank "
            "started its own engines. Build it with `with rollout_plugin.trl.make_pool(engine, pool_config) as "
            "pool:`, which starts one pool on the main process and gives the other ranks None")
