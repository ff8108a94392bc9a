"""Step quota with carry-over (APRIL-style over-sampling): never wait for the slowest group of a step.

A trainer step needs N whole groups (a GRPO advantage needs all k samples of a prompt). Sending exactly
N and waiting for all of them makes the step as long as its slowest sample, while the engines run a
shrinking batch. :class:`Steps` keeps more than N groups in flight, hands back the first N that
complete, and lets the rest run on into the next step — across a weight update, under ``keep`` or
``continue`` their tokens so far are kept and their segments record which version made which part.

    async with pool.steps(requests, in_flight=96) as steps:   # e.g. 1.5 × the step's 64 groups
        for step in range(10):
            groups = await steps.next(64)          # 64 whole groups, finished first
            train(groups)
            await pool.update_weights(step + 1, source, mode="continue", max_staleness=2)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING

from rollout_plugin.types import Request, Result

if TYPE_CHECKING:
    from rollout_plugin.pool.pool import RolloutPool

log = logging.getLogger(__name__)

__all__ = ["Steps"]


class Steps:
    """Keeps ``in_flight`` requests submitted; :meth:`next` returns whole groups as they complete."""

    def __init__(self, pool: RolloutPool, source: Iterable[Request] | AsyncIterable[Request], in_flight: int):
        if in_flight < 1:
            raise ValueError(f"in_flight={in_flight}: keep at least one group in flight")
        self.pool = pool
        self.in_flight = in_flight
        self._source = source
        self._iter: AsyncIterator[Request] | None = None
        self._exhausted = False
        self._pending: set[asyncio.Future[Result]] = set()
        self._done: asyncio.Queue[Result | BaseException] = asyncio.Queue()
        self.failed: list[Result] = []  # error records (after the pool's retries): not handed to a step
        self.steps = 0
        self.carried = 0  # groups that were still running when a step returned, summed over steps

    async def __aenter__(self) -> Steps:
        self._iter = _aiter(self._source)
        await self._refill()
        return self

    async def __aexit__(self, *exc_info) -> None:
        for f in self._pending:
            f.cancel()  # the pool drops what is queued and stops what runs
        self._pending.clear()

    async def next(self, groups: int) -> list[Result]:
        """The next ``groups`` whole groups to finish (fewer only when the source ran dry and all is done)."""
        out: list[Result] = []
        while len(out) < groups:
            if self._done.empty() and not self._pending:
                await self._refill()
                if not self._pending:
                    break  # the source is dry and everything came back
            result = await self._done.get()
            if isinstance(result, BaseException):
                raise result  # the pool failed (every engine dead): PoolError
            if result.ok:
                out.append(result)
            else:
                self.failed.append(result)
                log.warning("steps: %s failed (%s); it is not part of a step", result.id, result.error)
            await self._refill()
        self.steps += 1
        self.carried += len(self._pending)
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _refill(self) -> None:
        while not self._exhausted and len(self._pending) < self.in_flight:
            try:
                request = await anext(self._iter)  # type: ignore[arg-type]
            except StopAsyncIteration:
                self._exhausted = True
                return
            future = self.pool.submit(request)
            self._pending.add(future)
            future.add_done_callback(self._landed)

    def _landed(self, future: asyncio.Future[Result]) -> None:
        self._pending.discard(future)
        if not future.cancelled():
            self._done.put_nowait(future.exception() or future.result())


async def _aiter(source: Iterable[Request] | AsyncIterable[Request]) -> AsyncIterator[Request]:
    if hasattr(source, "__aiter__"):
        async for item in source:  # type: ignore[union-attr]
            yield item
    else:
        for item in source:  # type: ignore[union-attr]
            yield item
