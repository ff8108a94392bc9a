"""Control calls the TRL adapter makes to the pool's engines, through the pool's own fan-out.

:meth:`RolloutPool.engine_rpc` answers per engine and never raises; the adapter needs every engine to
answer (a weight transfer with one engine missing would hang the others in their NCCL rendezvous), so
a failed one is a :class:`TrainerAdapterError` naming the engine, the call and the fix (the pool's
:func:`~rollout_plugin.pool.require_ok`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.pool import require_ok

if TYPE_CHECKING:
    from rollout_plugin.pool import RpcAnswer, SyncRolloutPool

__all__ = ["engine_get", "engine_post_each"]

def engine_get(pool: SyncRolloutPool, path: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """``GET path`` on every engine at once: engine name -> its JSON answer."""
    answers = pool.run(lambda p: p.engine_rpc(path, timeout_s=timeout_s, method="GET"))
    return {a.engine: a.body for a in require_ok(answers, error=TrainerAdapterError)}


def engine_post_each(pool: SyncRolloutPool, path: str, bodies: Sequence[dict], *,
                     timeout_s: float = 600.0) -> list[Any]:
    """``POST path`` with ``bodies[i]`` to engine ``i``, all at once (they may wait on each other, e.g. in
    one NCCL rendezvous); the answers in engine order."""

    async def each(p: Any) -> list[RpcAnswer]:
        names = list(p.engine_names)
        if len(bodies) != len(names):
            raise TrainerAdapterError(f"POST {path}: {len(bodies)} bodies for {len(names)} engines")
        per_engine = await asyncio.gather(*(p.engine_rpc(path, body, timeout_s=timeout_s, engines=[name])
                                            for name, body in zip(names, bodies)))
        return [answer for answers in per_engine for answer in answers]

    return [a.body for a in require_ok(pool.run(each), error=TrainerAdapterError)]
