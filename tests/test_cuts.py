"""Why a call was cut (:class:`~rollout_plugin.pool.core.cuts.Cut`) and the attempt bound across continuations.

Issue 19, item 1: a retryable failure after the first token gave the attempt back, so a failure that recurs
after some tokens (a proxy's idle timeout, a repeatable server error) looped for ever. Each test runs on the
simulator's virtual clock under an ``asyncio.timeout``: the old loop fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio

import pytest

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.engine_client import Generation, Unavailable
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request, Sample, SamplingParams

DEADLINE_S = 600.0  # virtual seconds: the bounded path needs well under 1


class FailsAfterTokens:
    """Streams ``tokens`` tokens per call into the pool's progress, then the stream breaks — every call.

    ``prompt_ids``: whether it reports the prompt's token ids (vLLM's completions stream does per choice;
    chat puts them at the chunk's top level, where the client did not read them: then nothing can continue).
    ``hang``: instead of breaking, it waits (a hung engine) until the pool cuts the call."""

    reports_progress = True

    def __init__(self, name: str, tokens: int = 3, *, prompt_ids: bool = True, hang: bool = False):
        self.name, self.tokens, self.prompt_ids, self.hang = name, tokens, prompt_ids, hang
        self.calls = 0
        self.started = asyncio.Event()

    async def generate(self, requests, progress=None):
        self.calls += 1
        for i, r in enumerate(requests):
            for p in progress[i]:
                if self.prompt_ids and r.kind == "tokens":
                    p.prompt_token_ids = list(r.prompt)
        for step in range(self.tokens):
            await asyncio.sleep(0.01)
            for i, r in enumerate(requests):
                for p in progress[i]:  # token k of a sample is k counted from the token prompt's first id
                    p.token_ids.append((len(r.prompt) if r.kind == "tokens" else 0) + step)
        self.started.set()
        if self.hang:
            await asyncio.Event().wait()  # until cancelled
        raise Unavailable(f"{self.name}: stream closed mid-generation (HTTP 502 from a proxy)", status=502)

    async def healthy(self) -> bool:
        return True

    async def metrics(self) -> str | None:
        return None

    async def aclose(self) -> None:
        pass


class Finishes:
    """Streams every token and finishes with "length" (the engine that takes a continued sample)."""

    reports_progress = True
    name = "ok"

    def __init__(self, name: str = "ok"):
        self.name = name

    async def generate(self, requests, progress=None):
        await asyncio.sleep(0.01)
        return [Generation(tuple(Sample("", tuple(range(len(r.prompt), len(r.prompt) + r.sampling.max_tokens)),
                                        None, "length") for _ in range(r.n)), len(r.prompt), tuple(r.prompt))
                for r in requests]

    async def healthy(self) -> bool:
        return True

    async def metrics(self) -> str | None:
        return None

    async def aclose(self) -> None:
        pass


def pool_of(engines, **cfg) -> RolloutPool:
    cfg = {"per_engine": 4, "over_concurrency_ratio": 1.0, "backoff_base_s": 0.01, "backoff_cap_s": 0.1, **cfg}
    return RolloutPool(pool=PoolConfig(**cfg), controller=ControllerConfig(mode=ControllerMode.off), clients=engines,
                       clock=asyncio.get_running_loop().time)


def test_a_failure_after_tokens_that_recurs_ends_as_an_error_record_after_the_bound():
    """Text prompt, no prompt ids streamed: the old code requeued it as it was, attempt given back, for ever."""
    async def main():
        engine = FailsAfterTokens("a", prompt_ids=False)
        async with pool_of([engine], max_retries=2) as pool:
            async with asyncio.timeout(DEADLINE_S):  # old code: this fires (the call loops)
                result = await pool.submit(Request("r", "a prompt", sampling=SamplingParams(max_tokens=64)))
        return engine, result

    engine, result = run_virtual(main())
    assert not result.ok and "stream closed" in result.error
    assert result.attempts == 3 and engine.calls == 3  # max_retries + 1 tries, then the error record
    assert result.samples == ()  # never handed over as samples: an error record is not ok
    assert [s.token_ids for s in result.partial] == [(0, 1, 2)]  # the tokens the last try got are kept


def test_a_continued_sample_that_keeps_failing_keeps_every_token_in_its_error_record():
    """Token prompt: each try continues from the last one's tokens; the old code gave every try back, so only
    the sample's budget stopped it — and then it came back ok, stitched from six broken streams."""
    async def main():
        engine = FailsAfterTokens("a", tokens=2)
        async with pool_of([engine], max_retries=2) as pool:
            async with asyncio.timeout(DEADLINE_S):
                result = await pool.submit(Request("r", [7, 7], n=2, sampling=SamplingParams(max_tokens=12)))
        return engine, result

    engine, result = run_virtual(main())
    assert not result.ok and result.attempts == 3
    assert engine.calls <= 2 * 3  # each sample continues alone: at most 3 tries each
    assert len(result.partial) == 1 and result.partial[0].finish_reason is None
    tokens = result.partial[0].token_ids
    assert tokens == tuple(range(2, 2 + 6))  # three tries of two tokens, each continuing the last
    assert [(s.start, s.end) for s in result.partial[0].segments] == [(0, 6)]


def test_an_engine_dying_under_the_same_sample_again_and_again_counts():
    """Declared dead by the pool (a hung engine) under one sample on engine after engine: the old code gave the
    attempt back each time, until every engine was dead and the whole pool failed."""
    async def main():
        engines = [FailsAfterTokens(f"e{i}", hang=True) for i in range(4)]
        async with pool_of(engines, max_retries=2) as pool:
            d = pool._dispatcher
            future = pool.submit(Request("r", [5], sampling=SamplingParams(max_tokens=64)))
            async with asyncio.timeout(DEADLINE_S):
                while not future.done():
                    busy = [c.engine for c in d.ledger.calls]
                    if busy and engines[busy[0]].started.is_set():
                        d.mark_dead(busy[0], "test: no answer for stall_s")
                    await asyncio.sleep(0.01)  # virtual time: the pool's tasks run in between
            return engines, d, future.result()

    engines, d, result = run_virtual(main())
    assert not result.ok and result.attempts == 3 and "died" in result.error
    assert sum(e.healthy for e in d._engines) == 1  # the fourth engine was never put through it
    assert result.partial[0].token_ids == tuple(range(1, 10))  # three engines' tokens, continued


def test_a_weight_update_cut_does_not_count_against_the_sample():
    """Cut under ``mode=continue`` more often than max_retries: the sample still finishes, with every token."""
    async def main():
        hanging, ok = FailsAfterTokens("a", hang=True), Finishes("b")
        async with pool_of([hanging], max_retries=1) as pool:
            d = pool._dispatcher
            future = pool.submit(Request("r", [5], sampling=SamplingParams(max_tokens=20)))
            async with asyncio.timeout(DEADLINE_S):
                for _ in range(4):
                    hanging.started.clear()
                    await hanging.started.wait()
                    assert d.cut_inflight(Cut.CONTINUE) == 1
                d._engines[0].client = ok  # the fifth try goes to an engine that finishes
                return await future

    result = run_virtual(main())
    assert result.ok and result.attempts == 1  # four cuts by the pool, one try of its own
    assert result.samples[0].token_ids == tuple(range(1, 21)) and result.samples[0].finish_reason == "length"


def test_cut_names_keep_their_logged_values_and_an_unknown_one_is_refused():
    logged = ["dead", "abort", "continue", "stale", "closed", "failed", "abandoned"]  # the strings of before
    assert [str(Cut(v)) for v in logged] == logged
    assert [c for c in Cut if c.counts] == [Cut.DEAD]  # only an engine dying under a sample counts against it
    assert Cut("continue") is Cut.CONTINUE and f"{Cut.DEAD}" == "dead"

    async def main():
        async with pool_of([Finishes()]) as pool:
            with pytest.raises(ValueError):
                pool._dispatcher.cut_inflight("contine")

    run_virtual(main())
