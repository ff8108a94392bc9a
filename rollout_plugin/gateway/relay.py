"""The gateway's engine client: callers' bodies go through the pool as they are; answers come back whole or streamed.

The pool schedules :class:`Request` objects. A *pass-through* request carries the caller's body in its
metadata and a placeholder chat prompt, so the dispatcher sends it alone (chat requests never pack) to
the engine it picks — admission, per-engine caps, the adaptive controller, failover and restarts all
apply unchanged. :class:`PassThroughClient` posts the body to that engine and leaves the answer in the
request's :class:`Exchange`, where the HTTP handler reads it: the whole JSON, or (``stream``) each SSE
event as it arrives. Requests built by :mod:`rollout_plugin.gateway.native` are the pool's own (they
pack); the client only notes their errors and prompt token ids in their exchanges.

A stream is *committed* once its first event is in the exchange: until then a failed call is retried
by the pool like any other; after it, the caller gets an error event and ``[DONE]``, and the call ends
in :class:`StreamCut` (a :class:`Rejected`: never retried, so the answer is never started twice). A relayed stream
is read with the pool client's own parser (:class:`~rollout_plugin.pool.transport.sse.StreamedAnswer`): an error event inside
it, or a sample that ends without a finish reason, ends the call in :class:`StreamCut` with that verdict's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rollout_plugin.pool import CallError, Generation, Malformed, Progress, Rejected, TimedOut, Unavailable
from rollout_plugin.pool.transport import (  # the transport's own wire helpers: one verdict mapping for both paths
    DONE,
    JSON_HEADERS,
    HttpEngineClient,
    StreamedAnswer,
    aiter_events,
    json_body,
    raise_for_status,
)
from rollout_plugin.types import Request, Sample, SamplingParams

__all__ = ["Exchange", "PassThroughClient", "Relay", "StreamCut", "error_event", "gateway_request"]

log = logging.getLogger(__name__)

# A chat-kind prompt makes the dispatcher send each pass-through request in a call of its own.
PLACEHOLDER_PROMPT = [{"role": "user", "content": ""}]
ROUTES = {"completions": "/completions", "chat": "/chat/completions"}
END = None  # in an exchange's events: the pool resolved the request (nothing follows)


class StreamCut(Rejected):
    """A stream broke after the caller had part of it: not retried (the answer cannot start over); the engine
    is probed, as after any transport failure."""

    suspect = True


def error_event(message: str, status: int = 502, kind: str = "upstream_error") -> str:
    """An OpenAI-style in-stream error (what vLLM itself sends when a stream fails)."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}})


@dataclass(eq=False)
class Exchange:
    """One gateway request's side of the relay, written by the engine client, read by the HTTP handler."""

    stream: bool = False
    response: dict[str, Any] | None = None  # a pass-through's whole answer
    error: tuple[int | None, str] | None = None  # the last failed try: (HTTP status, message)
    prompt_ids: tuple[int, ...] | None = None  # a text prompt as the engine tokenized it (native requests)
    events: asyncio.Queue[str | None] | None = None  # stream only: SSE data as it arrives, then END
    committed: bool = False  # an event is out: no retry may start the answer again
    done: bool = False  # [DONE] is out: nothing more goes to the caller

    def push(self, data: str) -> None:
        if self.done:
            return
        self.committed = True
        self.done = data.strip() == DONE
        if self.events is not None:
            self.events.put_nowait(data)

    def cut(self, message: str, status: int = 502) -> None:
        """End a committed stream: an error event, then ``[DONE]``."""
        if self.committed and not self.done:
            self.push(error_event(message, status))
            self.push(DONE)

    def end(self, _future: object = None) -> None:
        """The pool resolved the request (a done-callback of its future)."""
        if self.events is not None:
            self.events.put_nowait(END)


@dataclass
class Relay:
    """State shared by the gateway's clients and handlers: exchanges by request id, clients by engine."""

    exchanges: dict[str, Exchange] = field(default_factory=dict)
    clients: dict[str, PassThroughClient] = field(default_factory=dict)

    def open(self, request_id: str, *, stream: bool = False) -> Exchange:
        ex = self.exchanges[request_id] = Exchange(stream=stream, events=asyncio.Queue() if stream else None)
        return ex

    def close(self, request_id: str) -> Exchange | None:
        """The handler is done with it (answered, or its caller left): later writes go nowhere."""
        return self.exchanges.pop(request_id, None)


def gateway_request(route: str, body: dict[str, Any], samples: int, max_samples: int, *,
                    stream: bool = False, affinity: str | None = None) -> Request:
    """A pass-through request. ``samples``: what the call asks for (prompts × n), counted against the engine's
    cap; a call larger than one engine's cap counts as the whole cap (it still goes to one engine).
    ``affinity``: its session's key (:mod:`.sessions`): it goes to the session's home engine."""
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    return Request(f"gw-{uuid.uuid4().hex}", PLACEHOLDER_PROMPT, n=max(1, min(samples, max_samples)),
                   sampling=SamplingParams(max_tokens=int(max_tokens)),
                   metadata={"route": ROUTES[route], "body": body, "stream": stream}, affinity=affinity)


def _fit(samples: list[Sample], n: int) -> tuple[Sample, ...]:
    """Exactly ``n`` samples for the pool's bookkeeping (a call larger than the cap counts as the cap); the
    caller's answer is the engine's own, in the exchange."""
    return tuple(samples[:n]) + (Sample(""),) * max(0, n - len(samples))


def _samples(data: dict[str, Any]) -> list[Sample]:
    out = []
    for choice in data.get("choices") or []:
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        ids = choice.get("token_ids")
        out.append(Sample(text or "", tuple(ids) if ids else None, None, choice.get("finish_reason")))
    return out


def _streamed_generation(answer: StreamedAnswer, n: int) -> Generation:
    """A relayed stream, for the pool's bookkeeping: token ids and finish reasons per choice."""
    samples = [Sample("", tuple(c["token_ids"]) if c.get("token_ids") else None, None, c.get("finish_reason"))
               for c in answer.merged()]
    return Generation(_fit(samples, n), int(answer.usage.get("prompt_tokens") or 0))


class PassThroughClient(HttpEngineClient):
    """An :class:`HttpEngineClient` whose pass-through calls carry a caller's OpenAI body instead of a pool prompt."""

    # A caller's answer is relayed as the engine gives it: the pool never ends one engine-side to move it (a
    # step's end, pool/policy/spread.py); the caller would get a cut answer, or one made of two.
    aborts_calls = False

    def __init__(self, *args: Any, relay: Relay, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.relay = relay
        # Native requests' samples continue after a cut only when their calls stream (pool.stream /
        # pool.stream_min_tokens); otherwise there is nothing to report.
        self.reports_progress = self.stream or self.stream_min_tokens is not None
        relay.clients[self.name] = self  # a restarted engine's client replaces the dead one's

    async def generate(self, requests: Sequence[Request], progress: Progress | None = None, *,
                       weight_version: int | None = None) -> list[Generation]:
        if "body" in requests[0].metadata:  # a caller's body: always alone (a chat-kind placeholder)
            return [await self._pass_through(r, self.cache_salt(weight_version)) for r in requests]
        exchanges = [self.relay.exchanges.get(r.id) for r in requests]  # native requests; none for pre-warm
        try:
            generations = await super().generate(requests, progress, weight_version=weight_version)
        except CallError as exc:
            for ex in exchanges:
                if ex is not None:
                    ex.error = (exc.status, str(exc))
            raise
        for r, ex, gen in zip(requests, exchanges, generations):
            if ex is not None:
                ex.error = None  # an earlier failed try
                # A continued sample's prompt is token ids (prompt + its tokens so far): only a text prompt's
                # own call says how the engine tokenized it.
                if r.kind == "text" and ex.prompt_ids is None:
                    ex.prompt_ids = gen.prompt_ids
        return generations

    async def _pass_through(self, r: Request, salt: str | None) -> Generation:
        ex = self.relay.exchanges.get(r.id)
        if ex is None:  # the caller is gone; the pool is about to drop it
            raise Rejected(f"{self.name}: {r.id}: nobody waits for this answer")
        # The caller's body as it is, with the weight version's cache salt unless the caller chose one.
        body = {**({"cache_salt": salt} if salt is not None else {}), **r.metadata["body"], "model": self.model}
        try:
            if r.metadata.get("stream"):
                gen = await self._stream(r, ex, body)
            else:
                data = await self._post(r.metadata["route"], body)
                ex.response = data
                gen = Generation(_fit(_samples(data), r.n), int((data.get("usage") or {}).get("prompt_tokens") or 0))
        except CallError as exc:
            ex.error = (exc.status, str(exc))
            raise
        ex.error = None
        return gen

    async def _stream(self, r: Request, ex: Exchange, body: dict[str, Any]) -> Generation:
        """Relay one SSE answer event by event into the exchange; see the module docstring for failures."""
        if ex.committed:  # requeued after a cut: the caller already has the start of an answer
            raise StreamCut(f"{self.name}: the stream was cut after it began; it is not sent again", status=502)
        answer = StreamedAnswer()  # the pool client's own parser: both read a stream the same way
        failure: CallError | None = None
        malformed: CallError | None = None
        try:
            async with self._session().post(self.api_base + r.metadata["route"], data=json_body(body),
                                            headers=JSON_HEADERS, **self._proxy) as resp:
                if resp.status != 200:
                    text = (await resp.read()).decode("utf-8", "replace")
                    raise_for_status(self.name, resp.status, text, resp.headers)
                async for data in aiter_events(resp.content.iter_any()):
                    try:
                        answer.add(data)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        malformed = malformed or Malformed(f"{self.name}: malformed event in stream")
                    if answer.error is None or ex.committed:  # an error before anything else is not forwarded
                        ex.push(data)  # the caller gets each event as the engine sent it
        except asyncio.CancelledError:  # the pool stopped the call: engine dead or hung, weights, close, caller gone
            ex.cut(f"{self.name}: the call was stopped mid-stream")
            raise
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            failure = TimedOut(f"{self.name}: stream: {type(exc).__name__}: {exc}")
        except (aiohttp.ClientError, OSError) as exc:
            failure = Unavailable(f"{self.name}: stream: {type(exc).__name__}: {exc}")
        verdict = answer.verdict(self.name) or malformed
        if failure is None and not ex.committed and verdict is not None:
            # vLLM failed the call before its first output (a request it refused when adding it, a full queue, a
            # dead engine core): nothing reached the caller, so the pool's retry and failover apply as for an
            # HTTP error, and the caller's answer is an ordinary error with that status.
            raise verdict
        if failure is None and not ex.done:
            failure = Unavailable(f"{self.name}: the stream ended without [DONE]")
        if failure is not None:
            if not ex.committed:
                raise failure  # nothing reached the caller: the pool's retry and failover apply
            ex.cut(str(failure))
            raise StreamCut(str(failure), status=502) from failure
        # An error event (forwarded already), a sample without a finish reason, an event we could not read: the
        # caller has the stream as it was; the request ends as an error, not retried.
        if verdict is not None:
            raise StreamCut(str(verdict), status=verdict.status or 502) from verdict
        return _streamed_generation(answer, r.n)
