"""An in-memory engine client for unit tests of policy and for faults a real engine can't produce.

Never the only test of a path users run: those also run against the real vLLM CPU engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from rollout_plugin.pool.core.engine_client import CallError, Generation, Rejected, Unavailable
from rollout_plugin.types import Request, Sample


class FakeEngine:
    """Answers each call after ``gate`` opens (or at once); records peak load; can be told to fail."""

    def __init__(self, name: str, *, tokens: int = 4, fail_with: CallError | None = None, dead: bool = False):
        self.name = name
        self.tokens = tokens
        self.fail_with = fail_with
        self.dead = dead
        self.calls: list[list[str]] = []
        self.inflight = 0
        self.peak = 0
        self.gate: asyncio.Event | None = None
        self.bad_ids: set[str] = set()  # requests this engine rejects with HTTP 400
        self.metrics_text: str | None = None

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        samples = sum(r.n for r in requests)
        self.inflight += samples
        self.peak = max(self.peak, self.inflight)
        self.calls.append([r.id for r in requests])
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)  # yield so concurrent calls overlap, as they do on a server
            if self.dead:
                raise Unavailable(f"{self.name}: connection refused")
            if self.fail_with is not None:
                raise self.fail_with
            if self.bad_ids & {r.id for r in requests}:
                raise Rejected(f"{self.name}: HTTP 400: bad prompt", status=400)
            return [Generation(tuple(Sample(f"{r.id}:{j}", tuple(range(self.tokens)), None, "length")
                                     for j in range(r.n)), 3) for r in requests]
        finally:
            self.inflight -= samples

    async def healthy(self) -> bool:
        return not self.dead

    async def metrics(self) -> str | None:
        return self.metrics_text

    async def aclose(self) -> None:
        pass
