"""An asyncio event loop on simulated time: the real pool code runs unmodified, hours pass in seconds.

``loop.time()`` is a virtual clock. When no callback is ready, the loop jumps the clock straight to
the next scheduled timer instead of waiting for it, so ``asyncio.sleep``, ``call_at`` and
``wait_for`` timeouts all fire in simulated seconds. There is no real I/O: the selector never
blocks, and a loop with nothing ready and nothing scheduled is a deadlock, raised as an error
rather than hanging forever.

    with VirtualTimeRunner() as runner:
        runner.run(main())   # inside main(), pass clock=asyncio.get_running_loop().time to the pool
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

from rollout_plugin.errors import SimulationError

T = TypeVar("T")


class _VirtualSelector(selectors.BaseSelector):
    """Holds registrations (the loop's self-pipe) but never polls: ``select(timeout)`` advances time."""

    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj, events, data=None):
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int) else fileobj.fileno(), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj):
        return self._map.pop(fileobj)

    def modify(self, fileobj, events, data=None):
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout=None):
        if timeout is None:
            # Nothing ready, nothing scheduled: in simulated time nothing can ever happen again.
            raise SimulationError("simulation deadlock: no callback is ready and no timer is scheduled")
        if timeout > 0 and self.loop is not None:
            self.loop.advance(timeout)
        return []

    def close(self) -> None:
        self._map.clear()

    def get_map(self):
        return self._map


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop whose clock starts at 0 and moves only when the loop is otherwise idle."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        self._now = 0.0
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        # Land exactly on the earliest timer: float rounding must never leave it a hair in the future.
        if self._scheduled and self._scheduled[0]._when > self._now:
            self._now = min(self._scheduled[0]._when, self._now + 1e-9)

    def run_in_executor(self, executor, func, *args):  # real threads would run on wall time
        raise SimulationError("the simulator runs no threads: run_in_executor/to_thread are not available")


class VirtualTimeRunner(asyncio.Runner):
    """``asyncio.Runner`` on a :class:`VirtualTimeLoop` (Ctrl-C still cancels the main task)."""

    def __init__(self, debug: bool | None = None):
        super().__init__(debug=debug, loop_factory=VirtualTimeLoop)

    def run(self, coro: Coroutine[Any, Any, T], *, context=None) -> T:
        return super().run(coro, context=context)


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on simulated time."""
    with VirtualTimeRunner() as runner:
        return runner.run(coro)
