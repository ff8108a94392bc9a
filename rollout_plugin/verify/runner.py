"""Running verifiers beside generation: loaded by dotted path, executed with bounded parallelism.

Three executors, one per kind of verifier:
- ``thread``: cheap or I/O-bound functions (the GIL is released while they wait);
- ``process``: CPU-bound functions get their own cores (the function must be importable by dotted
  path, which it is by construction);
- ``async``: ``async def`` verifiers that call a remote service, awaited on the event loop with at
  most ``workers`` calls open.

A verifier that takes a ``mode`` argument gets ``mode="fast"`` or ``mode="exact"`` (``verify.mode``).
Results are cached by (verifier, mode, prompt, example, completion) when a cache is given.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rollout_plugin.errors import VerifierError
from rollout_plugin.verify.cache import VerifyCache, cache_key

log = logging.getLogger(__name__)

Verifier = Callable[..., Any]  # fn(completion, example[, mode=...]) -> float, or an async def of the same
EXECUTORS = ("thread", "process", "async")


def load_verifier(path: str) -> Verifier:
    """``"pkg.module:function"`` or ``"pkg.module.function"`` -> the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise VerifierError(f"verify.verifier={path!r}: expected 'module:function' "
                            f"(try verify.verifier=rollout_plugin.verify.builtin:last_number_match)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VerifierError(f"verify.verifier={path!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise VerifierError(f"verify.verifier={path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def takes_mode(fn: Verifier) -> bool:
    try:
        return "mode" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


@dataclass
class VerifyStats:
    calls: int = 0  # verifier invocations (cache misses)
    cache_hits: int = 0
    errors: int = 0
    busy_s: float = 0.0  # wall time with at least one verification running or waiting for a worker
    peak_inflight: int = 0


class VerifierRunner:
    """``async with VerifierRunner(fn, "thread", 4) as v: reward, error = await v.score(text, example)``."""

    def __init__(self, fn: Verifier, executor: str = "thread", workers: int = 4, *, mode: str = "exact",
                 cache: VerifyCache | None = None, name: str | None = None, clock=time.monotonic):
        kind = getattr(executor, "value", executor)
        if kind not in EXECUTORS:
            raise VerifierError(f"verify.executor={kind!r}: expected one of {', '.join(EXECUTORS)}")
        is_async = inspect.iscoroutinefunction(fn)
        if is_async != (kind == "async"):
            raise VerifierError(
                f"verify.executor={kind!r}: the verifier {'is' if is_async else 'is not'} an async function "
                f"(try verify.executor={'async' if is_async else 'thread'})")
        self.kind = kind
        self.workers = workers
        self.mode = getattr(mode, "value", mode)
        self.name = name or f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', repr(fn))}"
        # partial(fn, mode=…) pickles by reference, so it still works in a process pool.
        self.fn = functools.partial(fn, mode=self.mode) if takes_mode(fn) else fn
        self.cache = cache
        self.stats = VerifyStats()
        self._clock = clock
        self._executor: Executor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inflight = 0
        self._busy_since = 0.0

    async def __aenter__(self) -> VerifierRunner:
        if self.kind == "process":
            self._executor = ProcessPoolExecutor(self.workers)
        elif self.kind == "thread":
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="verify")
        self._slots = asyncio.Semaphore(self.workers)
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._executor:
            # Off the loop: a process pool's shutdown joins its workers.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._executor = None

    def _enter(self) -> None:
        if self._inflight == 0:
            self._busy_since = self._clock()
        self._inflight += 1
        self.stats.peak_inflight = max(self.stats.peak_inflight, self._inflight)

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self.stats.busy_s += self._clock() - self._busy_since

    async def _call(self, completion: str, example: dict[str, Any]) -> float:
        if self.kind == "async":
            if self._slots is None:
                raise RuntimeError("use the runner inside `async with VerifierRunner(...)`")
            async with self._slots:
                return await self.fn(completion, example)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.fn, completion, example)

    async def score(self, completion: str, example: dict[str, Any],
                    prompt: Any = None) -> tuple[float | None, str | None]:
        """(reward, None) or (None, error text): a failing verifier is data, not a crash."""
        key = None
        if self.cache is not None:
            key = cache_key(self.name, self.mode, prompt, example, completion)
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit, None
        self._enter()
        try:
            reward = float(await self._call(completion, example))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the user's code: record and go on
            log.debug("verifier failed: %s", exc)
            self.stats.errors += 1
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            self._leave()
            self.stats.calls += 1
        if key is not None and self.cache is not None:
            self.cache.put(key, reward)
        return reward, None

    @property
    def inflight(self) -> int:
        return self._inflight
