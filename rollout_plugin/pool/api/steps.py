"""Step quota with carry-over (APRIL-style over-sampling): never wait for the slowest group of a step.

A trainer step needs N whole groups (a GRPO advantage needs all k samples of a prompt). Sending exactly
N and waiting for all of them makes the step as long as its slowest sample, while the engines run a
shrinking batch. :class:`Steps` keeps more than N groups in flight, hands back the first N that
complete, and lets the rest run on into the next step — across a weight update, under ``keep`` or
``continue`` their tokens so far are kept and their segments record which version made which part.

    async with pool.steps(requests, max_staleness=1) as steps:  # in flight: 2 × the step's groups
        for step in range(10):
            groups = await steps.next(64)          # 64 whole groups, finished first
            train(groups)
            await pool.update_weights(step + 1, source, mode="continue", max_staleness=1)

``in_flight`` unset is relative to the step (:data:`IN_FLIGHT_PER_STEP` × the groups the first ``next`` asks
for): a fixed count starves a large fleet or floods a small one. ``max_staleness`` (AReaL's staleness-aware
submission, arXiv:2505.24298 §5.1): no group starts before a step could take it within the bound — after ``i``
steps at most ``(i + max_staleness + 1)`` steps' groups have been submitted — so a fleet faster than the trainer
waits instead of generating groups that would be too old to train; a group whose oldest tokens are still more
than ``max_staleness`` versions behind the pool's when a step takes it is not handed out (``dropped``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING

from rollout_plugin.types import Request, Result

if TYPE_CHECKING:
    from rollout_plugin.pool.api.pool import RolloutPool

log = logging.getLogger(__name__)

__all__ = ["IN_FLIGHT_PER_STEP", "Steps", "in_flight_for"]

# Groups in flight per group a step takes: the step's own groups, and as many again generating for the next one
# while the trainer trains (one-step-off). Measured in the simulator (benchmarks/RESULTS.md, session 5; 64 H100s,
# 8 steps): 1.25 → 2.13× sync with 3.3 % wasted, 1.5 → 1.97× / 3.3 %, 2 → 2.17× / 1.4 %, 3 → the same as 2 (with
# max_staleness=1 the submission bound keeps at most two steps' groups out anyway).
IN_FLIGHT_PER_STEP = 2.0


def in_flight_for(groups_per_step: int, per_step: float = IN_FLIGHT_PER_STEP) -> int:
    """Groups to keep in flight for steps of ``groups_per_step`` groups."""
    return max(1, math.ceil(groups_per_step * per_step))


class Steps:
    """Keeps ``in_flight`` requests submitted (unset: relative to the first step's size, see
    :func:`in_flight_for`); :meth:`next` returns whole groups as they complete."""

    def __init__(self, pool: RolloutPool, source: Iterable[Request] | AsyncIterable[Request],
                 in_flight: int | None = None, *, max_staleness: int | None = None):
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight={in_flight}: keep at least one group in flight")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness}: must be >= 0 (weight versions)")
        self.pool = pool
        self.in_flight = in_flight
        self.max_staleness = max_staleness
        self._source = source
        self._iter: AsyncIterator[Request] | None = None
        self._exhausted = False
        self._pending: set[asyncio.Future[Result]] = set()
        self._done: asyncio.Queue[Result | BaseException] = asyncio.Queue()
        self.failed: list[Result] = []  # error records (after the pool's retries): not handed to a step
        self.dropped: list[Result] = []  # finished, but older than max_staleness when a step took them
        self.steps = 0
        self.submitted = 0
        self._per_step: int | None = None  # groups the first step asked for: the staleness bound's unit
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
        if self._per_step is None:
            self._per_step = groups
        if self.in_flight is None:
            self.in_flight = in_flight_for(groups)
        out: list[Result] = []
        while len(out) < groups:
            if self._done.empty() and not self._pending:
                await self._refill()
                if not self._pending:
                    break  # the source is dry and everything came back
            result = await self._done.get()
            if isinstance(result, BaseException):
                raise result  # the pool failed (every engine dead): PoolError
            if result.ok and self._too_stale(result):
                self.dropped.append(result)
                log.info("steps: %s dropped (weights %d, the pool's %d, max_staleness=%d)", result.id,
                         result.weight_version, self.pool.weight_version, self.max_staleness)
            elif result.ok:
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

    def _too_stale(self, result: Result) -> bool:
        return self.max_staleness is not None and \
            self.pool.weight_version - result.weight_version > self.max_staleness

    def _may_submit(self) -> bool:
        if self.in_flight is None or len(self._pending) >= self.in_flight:
            return False
        if self.max_staleness is None or self._per_step is None:
            return True
        replaced = len(self.failed) + len(self.dropped)  # groups no step took: others stand in for them
        return self.submitted < (self.steps + self.max_staleness + 1) * self._per_step + replaced

    async def _refill(self) -> None:
        while not self._exhausted and self._may_submit():
            try:
                request = await anext(self._iter)  # type: ignore[arg-type]
            except StopAsyncIteration:
                self._exhausted = True
                return
            future = self.pool.submit(request)
            self.submitted += 1
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
