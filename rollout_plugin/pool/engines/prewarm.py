"""Pre-warm: a few short requests to every engine before it gets real traffic.

A fresh vLLM server pays one-off costs on its first requests (CUDA-graph capture and allocator
growth on GPUs, lazy imports and kernel selection on CPU); NeMo Gym's guide warms servers before a
collection for that reason. The pool warms each engine before the dispatcher starts (and a
restarted engine before it rejoins), so no real request meets a cold engine. With a prompt that
carries the dataset's shared prefix (a system prompt), the prefix cache starts warm too.

All engine I/O goes through :class:`EngineClient`; the clock is passed in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rollout_plugin.config.schema import PrewarmConfig
from rollout_plugin.pool.transport.http import CallError, EngineClient
from rollout_plugin.types import Prompt, Request, SamplingParams

log = logging.getLogger(__name__)

WARM_TEXT = "Hello"
MIN_PREFIX_CHARS = 32  # a shorter shared text prefix is not worth a cache entry
MIN_PREFIX_TOKENS = 16
PREFIX_SAMPLE = 256  # prompts looked at to find the shared prefix


@dataclass(frozen=True)
class WarmupReport:
    engine: str
    warm_s: float  # from the first warm-up request to the last answer
    calls: int  # warm-up calls answered
    first_s: float | None  # latency of the first call (the cold one)
    last_s: float | None  # latency of the last call (warm)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _common(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix(prompts: Sequence[Prompt]) -> Prompt | None:
    """The prefix every prompt shares (a system message, a few-shot header), if long enough to matter."""
    sample = list(prompts[:PREFIX_SAMPLE])
    if len(sample) < 2:
        return None
    first = sample[0]
    if all(isinstance(p, str) for p in sample):
        n = min(_common(first, p) for p in sample[1:])  # type: ignore[arg-type]
        return first[:n] if n >= MIN_PREFIX_CHARS else None  # type: ignore[index]
    if all(isinstance(p, list) and p and isinstance(p[0], dict) for p in sample):
        head = first[0]  # type: ignore[index]
        if head.get("role") == "system" and all(p[0] == head for p in sample):  # type: ignore[index]
            return [head, {"role": "user", "content": WARM_TEXT}]
        return None
    if all(isinstance(p, list) and p and isinstance(p[0], int) for p in sample):
        n = min(_common(first, p) for p in sample[1:])  # type: ignore[arg-type]
        return list(first[:n]) if n >= MIN_PREFIX_TOKENS else None  # type: ignore[index]
    return None


def warm_requests(engine: str, cfg: PrewarmConfig, prompt: Prompt | None) -> list[Request]:
    sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0)
    requests = [Request(f"prewarm-{engine}-{i}", WARM_TEXT, n=1, sampling=sp) for i in range(cfg.requests)]
    if prompt is not None and cfg.requests:
        requests.append(Request(f"prewarm-{engine}-prefix", prompt, n=1,
                                sampling=SamplingParams(max_tokens=1, temperature=0.0)))
    return requests


async def warm_engine(client: EngineClient, cfg: PrewarmConfig, prompt: Prompt | None = None, *,
                      clock: Callable[[], float] = time.monotonic) -> WarmupReport:
    """Send the warm-up calls one after another (each waits for the last: a cold engine warms once)."""
    latencies: list[float] = []
    start = clock()
    error = None
    try:
        async with asyncio.timeout(cfg.timeout_s):
            for request in warm_requests(client.name, cfg, prompt):
                t0 = clock()
                await client.generate([request])
                latencies.append(clock() - t0)
    except (CallError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    report = WarmupReport(client.name, clock() - start, len(latencies), latencies[0] if latencies else None,
                          latencies[-1] if latencies else None, error)
    if error:
        log.warning("%s: cold -> in rotation unwarmed (warm-up failed after %d call(s): %s)", client.name,
                    report.calls, error)
    elif report.calls:
        log.info("%s: cold -> warm in %.2fs (%d calls; first %.3fs, last %.3fs)", client.name, report.warm_s,
                 report.calls, report.first_s, report.last_s)
    return report


async def prewarm(clients: Sequence[EngineClient], cfg: PrewarmConfig, prompt: Prompt | None = None, *,
                  clock: Callable[[], float] = time.monotonic) -> list[WarmupReport]:
    """Warm every engine at once; a report per engine, in order. Failures are reported, not raised:
    an engine that cannot answer a warm-up is the dispatcher's and the health monitor's to judge."""
    if cfg.requests <= 0:
        return []
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(warm_engine(c, cfg, prompt, clock=clock)) for c in clients]
    return [t.result() for t in tasks]
