"""A scriptable in-memory engine for the randomized invariant tests: each call does what its script says.

Faults a real engine can't produce on demand (short replies, 429s, 500s, rejections, slow calls,
death) in any order; on the simulator's virtual clock, so a schedule is deterministic and fast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from rollout_plugin.pool.core.engine_client import Generation, RateLimited, Rejected, Unavailable
from rollout_plugin.types import Request, Sample

ACTIONS = ("ok", "short", "429", "500", "400", "slow", "die")


VIOLATIONS: list[str] = []  # contract breaches seen by any fake engine; the tests assert it stays empty


def shared_params(requests) -> None:
    """The client contract a real engine call relies on: one call, one n, one set of sampling params
    (the HTTP client sends the first request's params for all of them). A breach is recorded, not raised:
    the pool would turn an exception into an error record and the test could not see it."""
    first = requests[0]
    if not all(r.n == first.n and r.sampling == first.sampling for r in requests):
        VIOLATIONS.append(f"a call mixed params: {[(r.id, r.n, r.sampling.max_tokens) for r in requests]}")
    if first.kind == "chat" and len(requests) > 1:
        VIOLATIONS.append("chat requests went several to a call")


class ChaosEngine:
    """Call ``i`` runs ``script[i]`` (then "ok" for ever) after ``delay_s`` of virtual time."""

    def __init__(self, name: str, script: Sequence[str], delay_s: float = 0.01, retry_after_s: float = 0.05):
        self.name = name
        self.script = list(script)
        self.delay_s = delay_s
        self.retry_after_s = retry_after_s
        self.dead = False
        self.calls = 0
        self.inflight = 0
        self.peak = 0

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        action = self.script[self.calls] if self.calls < len(self.script) else "ok"
        self.calls += 1
        shared_params(requests)
        samples = sum(r.n for r in requests)
        self.inflight += samples
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.delay_s * (50 if action == "slow" else 1))
            if self.dead:
                raise Unavailable(f"{self.name}: connection refused")
            if action == "die":
                self.dead = True
                raise Unavailable(f"{self.name}: connection reset")
            if action == "429":
                raise RateLimited(f"{self.name}: rate limited (429)", status=429, retry_after_s=self.retry_after_s)
            if action == "500":
                raise Unavailable(f"{self.name}: HTTP 500", status=500)
            if action == "400" and len(requests) == 1:
                raise Rejected(f"{self.name}: HTTP 400: bad prompt", status=400)
            gens = [Generation(tuple(Sample(f"{r.id}:{j}", (1, 2), None, "length") for j in range(r.n)), 3)
                    for r in requests]
            if action == "short":
                return gens[:-1] if len(gens) > 1 else [Generation(gens[0].samples[:-1], 3)]
            return gens
        finally:
            self.inflight -= samples

    async def healthy(self) -> bool:
        return not self.dead

    async def metrics(self) -> str | None:
        return None

    async def aclose(self) -> None:
        pass


class StreamingChaosEngine(ChaosEngine):
    """Streams tokens (fills the pool's progress) and can break, abort or die mid-call.

    Prompts are token ids ``[marker, *tokens so far]``; token ``k`` of a sample is ``k`` counted from the
    marker, so a sample continued any number of times must come out as ``0, 1, …, max_tokens - 1``.
    Actions: "ok", "break" (connection reset mid-call), "abort" (engine-side abort: the tokens so far come
    back with finish_reason "abort"), "die" (mid-call, for good), "500", "429" (before any token).
    """

    reports_progress = True
    ACTIONS = ("ok", "break", "abort", "die", "500", "429")

    async def generate(self, requests, progress=None):
        action = self.script[self.calls] if self.calls < len(self.script) else "ok"
        self.calls += 1
        shared_params(requests)
        if self.dead:
            raise Unavailable(f"{self.name}: connection refused")
        if action in ("500", "429"):
            await asyncio.sleep(self.delay_s)
            raise (RateLimited(f"{self.name}: 429", status=429, retry_after_s=self.retry_after_s) if action == "429"
                   else Unavailable(f"{self.name}: HTTP 500", status=500))
        starts = [len(r.prompt) - 1 for r in requests]
        budgets = [r.sampling.max_tokens for r in requests]
        cut = max(1, max(budgets) // 2) if action in ("break", "abort", "die") else None
        if progress is not None:
            for i, r in enumerate(requests):
                for p in progress[i]:
                    p.prompt_token_ids = list(r.prompt)
        for step in range(max(budgets)):
            if cut is not None and step == cut:
                if action == "abort":
                    return [Generation(tuple(Sample("", tuple(range(s, s + min(step, b))), None, "abort")
                                             for _ in range(r.n)), len(r.prompt), tuple(r.prompt))
                            for r, s, b in zip(requests, starts, budgets)]
                if action == "die":
                    self.dead = True
                raise Unavailable(f"{self.name}: connection reset mid-stream")
            await asyncio.sleep(self.delay_s / 8)
            if progress is not None:
                for i, (s, b) in enumerate(zip(starts, budgets)):
                    if step < b:
                        for p in progress[i]:
                            p.token_ids.append(s + step)
        return [Generation(tuple(Sample("", tuple(range(s, s + b)), None, "length") for _ in range(r.n)),
                           len(r.prompt), tuple(r.prompt)) for r, s, b in zip(requests, starts, budgets)]
