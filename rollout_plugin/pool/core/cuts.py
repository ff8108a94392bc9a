"""Why a running call was cut — one name per cause, and what each cause means for the call's units (pure).

Whoever cancels a call's task names the cause (``Resolver.cancel_calls``,
:mod:`rollout_plugin.pool.dispatch.resolver`); the outcome half (:mod:`rollout_plugin.pool.dispatch.outcomes`) reads
these properties instead of decoding strings. The values are the strings logged before this enum existed, so logs
and timelines read the same.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Cut"]


class Cut(str, Enum):
    """Why a call was cut. The first cause set on a call wins (a later one does not overwrite it)."""

    DEAD = "dead"  # its engine was declared dead (probe, monitor, crash): it moves elsewhere
    ABORT = "abort"  # a weight update with mode=abort: sent again from the start
    CONTINUE = "continue"  # a weight update with mode=continue: goes on from the tokens streamed so far
    STALE = "stale"  # started under weights older than max_staleness allows: sent again from the start
    CLOSED = "closed"  # the pool closed: close() already gave each request an error record
    FAILED = "failed"  # the pool failed: fail() already raised PoolError to each waiter
    ABANDONED = "abandoned"  # every request it carried is resolved (the caller left, a sibling failed)
    MOVE = "move"  # a step's end on a slow engine (pool/policy/straggler.py): goes on elsewhere from its tokens

    def __str__(self) -> str:  # the plain value in logs and f-strings, as before
        return self.value

    @property
    def salvages(self) -> bool:
        """Samples go on from the tokens that streamed in before the cut (otherwise they start over)."""
        return self in (Cut.DEAD, Cut.CONTINUE, Cut.MOVE)

    @property
    def avoids_engine(self) -> bool:
        """The units avoid this engine from now on (used only if nothing else fits)."""
        return self in (Cut.DEAD, Cut.MOVE)

    @property
    def counts(self) -> bool:
        """The cut counts against the sample's attempts: an engine dying under the same sample again and
        again is a fault to bound; a weight update or the staleness bound cutting it is the pool's doing."""
        return self is Cut.DEAD
