"""The one resolve path, as the dispatcher's parts see it, and the pool's run state they read.

Every way a request ends goes through :meth:`Resolver.resolve` (a whole ticket) or :meth:`Resolver.finish` (one
unit: a whole request or a piece of a split group), both over :meth:`Ledger.resolve
<rollout_plugin.pool.core.ledger.Ledger.resolve>`; calls left carrying only finished units are cut here. Whoever
cuts a call names the cause (:class:`~rollout_plugin.pool.core.cuts.Cut`); the first cause wins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rollout_plugin.errors import PoolError
from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.ledger import Call, Ledger, Ticket, Unit
from rollout_plugin.pool.observe.metrics import PoolMetrics
from rollout_plugin.types import Result

__all__ = ["PoolState", "Resolver"]


class PoolState(Protocol):
    """What the dispatcher's parts read of the pool's run (the dispatcher is one): whether it failed or is
    closing, the weight version it serves; and the one way to fail it."""

    @property
    def failure(self) -> PoolError | None: ...

    @property
    def closing(self) -> bool: ...

    @property
    def weight_version(self) -> int: ...

    def fail(self, error: PoolError) -> None: ...


class Resolver:
    """Ends units and tickets through the ledger, counts their results, cuts the calls they orphan."""

    def __init__(self, ledger: Ledger, metrics: PoolMetrics | None = None):
        self._ledger = ledger
        self.metrics = metrics

    def finish(self, unit: Unit, result: Result) -> None:
        """A unit's outcome: the ticket's result (a whole request), or one piece of a split group's."""
        for call in self._ledger.finish(unit, result):
            self.cancel(call, Cut.ABANDONED)
        self._count(result)

    def resolve(self, ticket: Ticket, result: Result | None = None, *, error: BaseException | None = None,
                outcome: str | None = None) -> None:
        for call in self._ledger.resolve(ticket, result, error=error, outcome=outcome):
            self.cancel(call, Cut.ABANDONED)
        if result is not None:
            self._count(result)

    def _count(self, result: Result) -> None:
        if self.metrics is not None:
            series = self.metrics.series(result.engine or "none")
            (series.ok if result.ok else series.error).inc()

    def cancel(self, call: Call, reason: Cut) -> None:
        if call.task is not None and not call.task.done():
            call.cancel_reason = call.cancel_reason or reason  # the first cause wins
            call.task.cancel()

    def cancel_calls(self, which: Callable[[Call], bool], reason: Cut | str) -> int:
        """Cut the running calls ``which`` picks, for ``reason`` (a :class:`Cut`, or its value: an unknown
        one raises ValueError here rather than being misread when the call settles)."""
        reason = Cut(reason)
        calls = [c for c in self._ledger.calls if which(c)]
        for call in calls:
            self.cancel(call, reason)
        return len(calls)
