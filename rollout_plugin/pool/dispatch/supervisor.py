"""Supervised helper tasks: the pool's monitor, node watch, probes, restarts and growth.

A helper that fails is logged and stops (the pool degrades: caps stay where they are, an engine stays
out); it never cancels a caller. That is why the pool does not run its helpers in an
``asyncio.TaskGroup`` entered by the caller's task: a failing child there cancels the *parent* — the
user's ``generate()``. Here every task is still owned and awaited: :meth:`Supervisor.aclose` cancels
them and waits, bounded, so nothing outlives the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Supervisor"]


class Supervisor:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures: list[tuple[str, BaseException]] = []  # (helper, what stopped it), for stats and tests

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any],
              on_error: Callable[[BaseException], None] | None = None) -> asyncio.Task[None]:
        """Run ``coro`` as helper ``name``; if it raises, log it and call ``on_error`` (never re-raise)."""
        task = asyncio.get_running_loop().create_task(self._guard(name, coro, on_error), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: coro.close())  # cancelled before it started: no "never awaited" warning
        return task

    async def _guard(self, name: str, coro: Coroutine[Any, Any, Any],
                     on_error: Callable[[BaseException], None] | None) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a helper's failure is logged and contained; the pool goes on without it
            self.failures.append((name, exc))
            log.error("%s: running -> stopped (%s: %s); the pool goes on without it", name, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:
                    log.exception("%s: its error handler failed too", name)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Cancel every helper and wait for them (at most ``timeout_s``: a helper stuck in a thread is left)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
            for task in stuck:
                log.warning("%s: did not stop within %.0fs of close", task.get_name(), timeout_s)
