"""Run a command's coroutine so that Ctrl-C (and SIGTERM) always stops it, whatever the load.

``asyncio.run`` cancels the main task once on the first Ctrl-C; if that one cancellation is swallowed
anywhere below (a library catching ``CancelledError`` at the wrong moment), the job runs on to the end
and exits 0. Here a signal cancels the main task and keeps cancelling it every second until it ends,
and the command then exits as interrupted (130, or 143 for SIGTERM) even if the task returned. The
pool's own ``__aexit__`` runs on the way out, so every engine it launched is stopped. A second Ctrl-C
stops waiting for a clean shutdown (the launcher's exit hooks still stop the engines).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Interrupted", "run"]

RECANCEL_S = 1.0


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; ``code`` is the exit status (128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


class _Stopper:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None
        self.signum: int | None = None
        self.count = 0

    def fire(self, signum: int) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.count > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop waiting for a clean shutdown
        self._cancel()

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            self.loop.call_later(RECANCEL_S, self._cancel)  # a swallowed cancellation gets another


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)``, but a signal always stops it: raises :class:`Interrupted` after one."""
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        stopper = _Stopper(loop)

        async def main() -> T:
            stopper.task = asyncio.current_task()
            return await coro

        for signum in signals:
            loop.add_signal_handler(signum, stopper.fire, signum)
        try:
            result = runner.run(main())
        except asyncio.CancelledError:
            if stopper.signum is None:
                raise
            raise Interrupted(stopper.signum) from None
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
    if stopper.signum is not None:  # it finished despite the signal: still report the interruption
        raise Interrupted(stopper.signum)
    return result
