"""The keep-alive race: a server closes an idle connection just as the client reuses it.

Idle connections close before vLLM's own keep-alive (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, 5 s) closes them: a POST
sent on a connection the server is closing fails, and aiohttp retries only idempotent methods. The server's clock
starts when it sent its answer, ours when our loop has read it; on a loaded box (load 13–15 on 2 cores,
benchmarks/RESULTS.md session 12) that lag passed a second, and calls failed with ``ServerDisconnectedError``
(counted as engine failures, they sent both engines of a pair to ``suspect``). So the margin is 3 s, and a request
dropped on a *reused* connection before any answer — which never ran there — may go once more on a fresh one
(:meth:`rollout_plugin.pool.transport.http.HttpEngineClient._send`). aiohttp's reuse trace says which connection
a request went out on.
"""

from __future__ import annotations

from typing import Any

import aiohttp

__all__ = ["KEEPALIVE_S", "REUSE_TRACE", "Exchange", "Raced"]

KEEPALIVE_S = 2.0


class Exchange:
    """One request's trace (its ``trace_request_ctx``): was it sent on a kept-alive connection, and did an
    answer begin?"""

    __slots__ = ("reused", "answered")

    def __init__(self) -> None:
        self.reused = False
        self.answered = False


class Raced(Exception):
    """A kept-alive connection dropped before any answer: the keep-alive race (its cause: aiohttp's error)."""


async def _on_reuse(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, Exchange):
        ctx.trace_request_ctx.reused = True


REUSE_TRACE = aiohttp.TraceConfig()
REUSE_TRACE.on_connection_reuseconn.append(_on_reuse)
REUSE_TRACE.freeze()
