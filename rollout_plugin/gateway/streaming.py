"""Streamed answers: an engine's SSE events go to the HTTP caller as they arrive, through the pool.

The handler submits the pass-through request and waits for its exchange's first item: an event
(the stream is committed: the HTTP answer starts, 200, ``text/event-stream``) or the pool's verdict
without one (an ordinary JSON error with the engine's status: nothing was sent, so retries and
failover already happened inside the pool). :func:`relay_events` then writes each event as it comes;
it always ends with ``[DONE]``, and whatever way it ends (done, cut, caller gone) the request's pool
future is settled or cancelled — a cancelled future makes the pool drop the request and cancel its
call, which closes the engine connection so the engine aborts the generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rollout_plugin.gateway.relay import DONE, END, Exchange, Relay, error_event
from rollout_plugin.types import Result

__all__ = ["EventStream", "frame", "relay_events"]

log = logging.getLogger(__name__)

SETTLE_S = 30.0  # after [DONE]: how long the pool may take to settle the call before the caller's answer closes


def frame(data: str) -> bytes:
    """One SSE event (a ``data:`` line per line of ``data``)."""
    return ("".join(f"data: {line}\n" for line in data.split("\n")) + "\n").encode()


async def relay_events(ex: Exchange, first: str, future: asyncio.Future[Result]) -> AsyncIterator[bytes]:
    """The HTTP body of a committed stream, from its first event on; it always ends with ``[DONE]``.

    Events already queued go out as one write, and each write yields to the loop first: a backlog (a loaded
    gateway) must not relay a whole generation in one go before the loop can see that the caller hung up."""
    queue: asyncio.Queue[str | None] = ex.events  # type: ignore[assignment]  # a stream's exchange has a queue
    item: str | None = first
    while item is not END:
        chunk = [frame(item)]
        while item.strip() != DONE and not queue.empty() and (item := queue.get_nowait()) is not END:
            chunk.append(frame(item))
        yield b"".join(chunk)
        if item is END or item.strip() == DONE:
            break
        await asyncio.sleep(0)  # the caller's disconnect, if any, is seen before the next write
        item = await queue.get()
    if item is END:  # the pool ended the request before the engine's [DONE] (the pool closed or failed)
        yield frame(error_event("the request ended before its stream did (the pool closed or failed)"))
        yield frame(DONE)
        return
    # [DONE] is out. Let the pool settle the call (its outcome is the engine's, not "abandoned").
    try:
        await asyncio.wait_for(asyncio.shield(future), SETTLE_S)
    except Exception:  # noqa: BLE001  (TimeoutError, or the pool's own failure: the caller has its answer)
        pass


class EventStream(StreamingResponse):
    """A committed stream's HTTP answer. However it ends — done, cut, the caller gone (Starlette then cancels
    the body mid-iteration, or before it started) — the pool future is settled or cancelled and the exchange
    leaves the relay."""

    def __init__(self, relay: Relay, request_id: str, ex: Exchange, first: str, future: asyncio.Future[Result]):
        super().__init__(relay_events(ex, first, future), media_type="text/event-stream")
        self._relay, self._request_id, self._future = relay, request_id, future

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._future.done():
                log.info("%s: the caller left mid-stream: its request is dropped (the engine aborts it)",
                         self._request_id)
                self._future.cancel()  # the pool drops the request and cancels its call: the engine aborts it
            self._relay.close(self._request_id)
