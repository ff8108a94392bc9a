"""A call moved at a step's end on the real vLLM CPU engine: ended engine-side, continued from its tokens.

The pool names each call (``X-Request-Id``) and ends it with vLLM's ``/abort_requests``
(``vllm/entrypoints/rl/online/api_router.py``); vLLM answers the waiting, non-streamed call with each sample's
tokens so far, finish reason ``abort`` (``vllm/v1/engine/output_processor.py`` ``abort_requests``), and the pool
continues every unfinished sample from them. What this checks is what the simulator assumes of vLLM: no token the
engine generated before the move is generated again, and every sample still gets its whole length.
"""

from __future__ import annotations

import asyncio

import pytest

from engine_fixtures import engine_counter, start_when_idle
from rollout_plugin.config.schema import ControllerConfig, ControllerMode, EngineConfig, PoolConfig
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams

pytestmark = pytest.mark.engine

TOKENS = 900  # long enough that the move lands mid-sample on a 2-core machine
REQUESTS, N = 8, 4  # 28,800 tokens: longer than a busy engine takes to answer /metrics (up to 3.7 s)
SAMPLES = REQUESTS * N
ATTEMPTS = 3  # a fast engine can finish every sample before the abort lands: that run proves nothing


async def run_move(live_engine) -> tuple[list, int, float]:
    engine = EngineConfig(urls=[live_engine.url], api_key=live_engine.api_key, max_model_len=1024, dev_mode=True)
    reqs = [Request(f"m{i}", [1, 10, 20, 30, 40, 50], n=N,
                    sampling=SamplingParams(max_tokens=TOKENS, temperature=1.0, ignore_eos=True))
            for i in range(REQUESTS)]
    # Not streamed: the tokens so far come only from vLLM's answer to the abort.
    async with RolloutPool(engine, PoolConfig(per_engine=SAMPLES), ControllerConfig(mode=ControllerMode.off)) as pool:
        task, before = await start_when_idle(live_engine, pool, reqs, SAMPLES)
        # One look at the engine gives it time for its first tokens (not a wait for a token count: /metrics
        # lags). Whether the abort landed mid-sample is checked after the run (``continued``) and retried.
        await engine_counter(live_engine, "vllm:generation_tokens_total")
        moved = pool._require().spread_calls(0, 10)  # what the monitor does at a step's end (pool/policy/spread.py)
        results = await asyncio.wait_for(task, 300)
        continued = pool.stats().continued
        generated = await engine_counter(live_engine, "vllm:generation_tokens_total") - before
    assert moved in (0, SAMPLES)
    return results, continued, generated, moved


def test_a_call_moved_at_a_steps_end_continues_from_the_tokens_vllm_answered_with(live_engine):
    tries = []
    for _ in range(ATTEMPTS):
        results, continued, generated, moved = asyncio.run(run_move(live_engine))
        tries.append((moved, continued, generated))
        if continued:
            break
    else:
        pytest.fail(f"the abort never landed mid-sample in {ATTEMPTS} runs (samples moved, continued, tokens "
                    f"generated: {tries}): nothing to check")
    for r in results:
        assert r.ok, r.error
        assert [len(s.token_ids) for s in r.samples] == [TOKENS] * N
    # Every token the engine generated is in a result: a sample started over would generate its tokens twice.
    assert generated == SAMPLES * TOKENS, (generated, continued)
