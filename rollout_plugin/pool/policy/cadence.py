"""How long the monitor waits before it looks at the engines again (pure).

Every look is a ``/metrics`` call on each engine's API server. On CPU engines that share their cores with the
generating process, a 1 Hz scrape of a busy pair cost ~10 % of its makespan (benchmarks/RESULTS.md, session 8:
the same static split with and without a 1 Hz scraper beside it, 3 of 3 rounds; the pool with looks every 10 s
beat the pool with looks every second 9 of 9 rounds). The controller needs fresh numbers only while it has
something to decide: work waiting for a cap, an engine at its cap (a raise may pay), KV pressure or preemptions
(a cut), a trial open, a slow engine (moves at a step's end), an engine that did not answer. With none of these
the period doubles from ``controller.interval_s`` up to ``controller.quiet_interval_s``; work that queues ends
the wait at once (:func:`urgent`, checked every ``interval_s`` without any I/O), and so does an engine
going idle at a step's end while another still holds work (:func:`tail_opened`): the tail spread acts on that
look, and a quiet period of 8 s would otherwise let a short step's whole tail pass unseen (a CPU pair's 2 s
tail on a 9 s step was never spread: benchmarks/RESULTS.md, session 12).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Needs", "busy", "next_wait", "tail_opened", "urgent"]


@dataclass(frozen=True)
class Needs:
    """What one look found that needs the next look soon."""

    backlog: int = 0  # samples queued in the pool, waiting for capacity
    at_cap: bool = False  # some engine runs at (the controller's share of) its cap: a raise may pay
    pressure: bool = False  # some engine's KV above kv_high, or it preempted since the last look
    deciding: bool = False  # a cap or pack size moved, a verdict was given, a trial is open, first caps unsized
    slow: bool = False  # some engine decodes below slow_below × the fleet: its work may move
    unseen: bool = False  # some healthy engine gave no numbers (a hang is probed on the next look)


def busy(needs: Needs) -> bool:
    return (needs.backlog > 0 or needs.at_cap or needs.pressure or needs.deciding or needs.slow
            or needs.unseen)


def next_wait(previous_s: float, needs: Needs, interval_s: float, quiet_interval_s: float) -> float:
    """Seconds until the next look: ``interval_s`` while anything needs deciding, else double the last wait,
    at most ``quiet_interval_s``."""
    if busy(needs) or quiet_interval_s <= interval_s:
        return interval_s
    return min(quiet_interval_s, 2 * max(interval_s, previous_s))


def urgent(backlog: int) -> bool:
    """Work queued while the monitor waits: caps may bind, so the next look comes now."""
    return backlog > 0


def tail_opened(idle: frozenset[int], idle_at_last_look: frozenset[int], backlog: int, crowded: bool) -> bool:
    """An engine went idle since the last look while nothing waits in the pool and another engine still decodes
    several of its samples (``crowded``): the step's tail began, and the spread decides on a look."""
    return backlog == 0 and crowded and bool(idle - idle_at_last_look)
