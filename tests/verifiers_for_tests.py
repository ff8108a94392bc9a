"""Verifiers the tests and benchmarks load by dotted path (importable in child processes too)."""

from __future__ import annotations

import asyncio
import os
import time

def slow_length(completion: str, example: dict) -> float:
    """A deliberately slow verifier: sleeps (I/O-like; SLOW_VERIFIER_S, default 0.25 s), then scores by length."""
    time.sleep(float(os.environ.get("SLOW_VERIFIER_S", "0.25")))
    return float(len(completion) % 7)


def moded(completion: str, example: dict, mode: str = "exact") -> float:
    return 1.0 if mode == "fast" else 2.0


def failing(completion: str, example: dict) -> float:
    raise ValueError("no reward for you")


REMOTE = {"open": 0, "peak": 0}


async def remote(completion: str, example: dict) -> float:
    REMOTE["open"] += 1
    REMOTE["peak"] = max(REMOTE["peak"], REMOTE["open"])
    try:
        await asyncio.sleep(0.01)  # a remote call
    finally:
        REMOTE["open"] -= 1
    return float(len(completion))
