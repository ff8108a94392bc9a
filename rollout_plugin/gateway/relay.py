"""The gateway's engine client: OpenAI bodies go through the pool as they are, answers come back whole.

The pool schedules :class:`Request` objects; a gateway request carries the caller's body in its
metadata and a placeholder chat prompt, so the dispatcher sends it alone (chat requests never
pack) to the engine it picks — admission, per-engine caps, the adaptive controller, failover and
restarts all apply unchanged. :class:`PassThroughClient` posts the body to that engine and leaves
the raw JSON answer in the shared :class:`Relay`, where the HTTP handler picks it up by request id.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout_plugin.pool.client import CallError, Generation, HttpEngineClient
from rollout_plugin.types import Request, Sample, SamplingParams

log = logging.getLogger(__name__)

# A chat-kind prompt makes the dispatcher send each gateway request in a call of its own.
PLACEHOLDER_PROMPT = [{"role": "user", "content": ""}]
ROUTES = {"completions": "/completions", "chat": "/chat/completions"}


@dataclass
class Relay:
    """State shared by the gateway's clients and handlers: answers by request id, clients by engine."""

    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    clients: dict[str, PassThroughClient] = field(default_factory=dict)

    def take(self, request_id: str) -> tuple[dict[str, Any] | None, tuple[int | None, str] | None]:
        return self.responses.pop(request_id, None), self.errors.pop(request_id, None)


def gateway_request(route: str, body: dict[str, Any], samples: int, max_samples: int) -> Request:
    """``samples``: what the call asks for (prompts × n), counted against the engine's cap; a call larger
    than one engine's cap counts as the whole cap (it still goes to one engine)."""
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    return Request(f"gw-{uuid.uuid4().hex}", PLACEHOLDER_PROMPT, n=max(1, min(samples, max_samples)),
                   sampling=SamplingParams(max_tokens=int(max_tokens)),
                   metadata={"route": ROUTES[route], "body": body})


def _samples(data: dict[str, Any]) -> tuple[Sample, ...]:
    out = []
    for choice in data.get("choices") or []:
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        ids = choice.get("token_ids")
        out.append(Sample(text or "", tuple(ids) if ids else None, None, choice.get("finish_reason")))
    return tuple(out)


class PassThroughClient(HttpEngineClient):
    """An :class:`HttpEngineClient` whose calls carry a caller's OpenAI body instead of a pool prompt."""

    reports_progress = False  # a caller's answer goes back whole or not at all: nothing to continue from

    def __init__(self, *args: Any, relay: Relay, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.relay = relay
        relay.clients[self.name] = self  # a restarted engine's client replaces the dead one's

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        out = []
        for r in requests:
            if "body" not in r.metadata:  # the pool's own traffic (pre-warm) takes the ordinary path
                out.extend(await super().generate([r]))
                continue
            try:
                data = await self._post(r.metadata["route"], {**r.metadata["body"], "model": self.model})
            except CallError as exc:
                self.relay.errors[r.id] = (exc.status, str(exc))
                raise
            self.relay.errors.pop(r.id, None)  # an earlier failed try on another engine
            self.relay.responses[r.id] = data
            out.append(Generation(_samples(data), int((data.get("usage") or {}).get("prompt_tokens") or 0)))
        return out

    async def control(self, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        """POST a server-root control call (``/pause``, ``/collective_rpc`` …): (status, JSON or text)."""
        try:
            reply = await self.call_root(path, body, timeout_s=self._health_timeout * 12)
        except CallError as exc:  # a 502 row for this engine, not a crash
            return 502, str(exc)
        try:
            return reply.status, json.loads(reply.body) if reply.body else None
        except ValueError:
            return reply.status, reply.text[:300]
