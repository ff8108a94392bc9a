"""Running verifiers beside generation: loaded by dotted path, executed in a bounded executor.

Threads suit cheap or I/O-bound verifiers; ``executor=process`` gives CPU-heavy ones their own cores
(the function must then be importable by dotted path, which it is by construction).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from rollout_plugin.errors import VerifierError

log = logging.getLogger(__name__)

Verifier = Callable[[str, dict[str, Any]], float]


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


class VerifierRunner:
    """``async with VerifierRunner(fn, "thread", 4) as v: reward, error = await v.score(text, example)``."""

    def __init__(self, fn: Verifier, executor: str = "thread", workers: int = 4):
        self.fn = fn
        self.kind = executor
        self.workers = workers
        self._executor: Executor | None = None
        self.busy_s = 0.0

    async def __aenter__(self) -> VerifierRunner:
        self._executor = (ProcessPoolExecutor(self.workers) if self.kind == "process"
                          else ThreadPoolExecutor(self.workers, thread_name_prefix="verify"))
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def score(self, completion: str, example: dict[str, Any]) -> tuple[float | None, str | None]:
        """(reward, None) or (None, error text): a failing verifier is data, not a crash."""
        loop = asyncio.get_running_loop()
        try:
            reward = await loop.run_in_executor(self._executor, self.fn, completion, example)
            return float(reward), None
        except Exception as exc:  # the user's code: record and go on
            log.debug("verifier failed: %s", exc)
            return None, f"{type(exc).__name__}: {exc}"
