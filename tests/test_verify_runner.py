"""Verifier execution: executors, fast/exact mode, the bounded cache, errors as data."""

from __future__ import annotations

import asyncio

import pytest

import verifiers_for_tests as vt
from rollout_plugin.errors import VerifierError
from rollout_plugin.verify import VerifierRunner, VerifyCache, last_number_match, load_verifier


def test_cache_is_bounded_and_lru():
    cache = VerifyCache(2)
    cache.put(b"a", 1.0)
    cache.put(b"b", 2.0)
    assert cache.get(b"a") == 1.0  # a is now the most recent
    cache.put(b"c", 3.0)
    assert len(cache) == 2 and cache.get(b"b") is None and cache.get(b"a") == 1.0 and cache.get(b"c") == 3.0
    assert (cache.hits, cache.misses) == (3, 1)
    off = VerifyCache(0)
    off.put(b"a", 1.0)
    assert off.get(b"a") is None and len(off) == 0


async def test_repeated_completion_is_verified_once():
    async with VerifierRunner(vt.moded, "thread", 2, cache=VerifyCache(10)) as v:
        first = await v.score("x", {"answer": 1}, prompt="p")
        again = await v.score("x", {"answer": 1}, prompt="p")
        other_prompt = await v.score("x", {"answer": 1}, prompt="q")
    assert first == again == other_prompt == (2.0, None)
    assert (v.stats.calls, v.stats.cache_hits) == (2, 1)


async def test_mode_reaches_verifiers_that_take_it():
    async with VerifierRunner(vt.moded, "thread", 1, mode="fast") as fast:
        assert await fast.score("x", {}) == (1.0, None)
    async with VerifierRunner(vt.moded, "process", 1, mode="exact") as exact:
        assert await exact.score("x", {}) == (2.0, None)
    assert last_number_match("= 2.0", {"answer": "2"}, mode="exact") == 1.0
    assert last_number_match("= 2.0", {"answer": "2"}, mode="fast") == 0.0


async def test_errors_are_data_and_not_cached():
    async with VerifierRunner(vt.failing, "thread", 1, cache=VerifyCache(10)) as v:
        for _ in range(2):
            reward, error = await v.score("x", {})
            assert reward is None and error == "ValueError: no reward for you"
    assert v.stats.errors == 2 and v.stats.cache_hits == 0


async def test_async_verifiers_run_at_most_workers_at_once():
    vt.REMOTE["peak"] = 0
    async with VerifierRunner(vt.remote, "async", 3) as v:
        rewards = await asyncio.gather(*(v.score("abcd" + "x" * i, {}) for i in range(12)))
    assert [r for r, _ in rewards] == [float(4 + i) for i in range(12)]
    assert vt.REMOTE["peak"] == 3 and v.stats.calls == 12


def test_executor_must_match_the_verifier_kind():
    with pytest.raises(VerifierError, match=r"verify.executor='thread'.*try verify.executor=async"):
        VerifierRunner(vt.remote, "thread")
    with pytest.raises(VerifierError, match=r"verify.executor='async'.*try verify.executor=thread"):
        VerifierRunner(vt.moded, "async")
    with pytest.raises(VerifierError, match="verify.verifier='nope'"):
        load_verifier("nope")
