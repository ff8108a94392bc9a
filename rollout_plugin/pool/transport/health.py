"""Health looks: one engine's ``healthy()`` read with patience for a busy API process."""

from __future__ import annotations

import asyncio

from rollout_plugin.pool.core.engine_client import EngineClient

__all__ = ["HEALTH_LOOKS", "HEALTH_SLOW_S", "looks_healthy"]

HEALTH_LOOKS = 3  # health checks that timed out before an engine counts as not answering
HEALTH_SLOW_S = 0.5  # a failed look that took this long timed out, rather than got an answer


async def looks_healthy(client: EngineClient) -> bool:
    """``client.healthy()``, looked at again when a look failed slowly (its timeout ran out): a busy vLLM API
    process can answer seconds late (a /metrics took 3.7 s on a loaded 2-core machine), and one slow answer
    must not take a live engine out. A quick failure (refused, an error answer) is the verdict at once."""
    loop = asyncio.get_running_loop()
    for _ in range(HEALTH_LOOKS):
        started = loop.time()
        if await client.healthy():
            return True
        if loop.time() - started < HEALTH_SLOW_S:
            return False
    return False
