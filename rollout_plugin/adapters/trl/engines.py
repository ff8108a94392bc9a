"""Control calls the TRL adapter makes to the pool's engines, through the pool's own fan-out.

:meth:`RolloutPool.control` answers per engine and never raises; the adapter needs every engine to
answer (a weight transfer with one engine missing would hang the others in their NCCL rendezvous), so
a failed one is a :class:`TrainerAdapterError` naming the engine, the call and the fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    from rollout_plugin.pool.pool import ControlAnswer, SyncRolloutPool

__all__ = ["engine_get", "engine_post_each"]

DEV_MODE_HINT = "the engine needs vLLM's dev endpoints (engine.dev_mode=true, i.e. VLLM_SERVER_DEV_MODE=1)"


def _checked(method: str, path: str, answers: Sequence[ControlAnswer]) -> list[ControlAnswer]:
    for a in answers:
        if not a.ok:
            hint = f"; {DEV_MODE_HINT}" if a.status == 404 else ""
            raise TrainerAdapterError(f"{a.engine}: {method} {path} failed: {a.error or f'HTTP {a.status}'}{hint}")
    return list(answers)


def engine_get(pool: SyncRolloutPool, path: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """``GET path`` on every engine at once: engine name -> its JSON answer."""
    answers = pool.run(lambda p: p.control(path, timeout_s=timeout_s, method="GET"))
    return {a.engine: a.body for a in _checked("GET", path, answers)}


def engine_post_each(pool: SyncRolloutPool, path: str, bodies: Sequence[dict], *,
                     timeout_s: float = 600.0) -> list[Any]:
    """``POST path`` with ``bodies[i]`` to engine ``i``, all at once (they may wait on each other, e.g. in
    one NCCL rendezvous); the answers in engine order."""

    async def each(p: Any) -> list[ControlAnswer]:
        names = list(p.engine_names)
        if len(bodies) != len(names):
            raise TrainerAdapterError(f"POST {path}: {len(bodies)} bodies for {len(names)} engines")
        per_engine = await asyncio.gather(*(p.control(path, body, timeout_s=timeout_s, engines=[name])
                                            for name, body in zip(names, bodies)))
        return [answer for answers in per_engine for answer in answers]

    return [a.body for a in _checked("POST", path, pool.run(each))]
