"""Spreading a step's tail: at a step's end, idle engines take calls off crowded ones (pure).

A step ends with its longest samples, and a sample's decode step is slower the more context its batch holds
(the H100 profile: 6.2 ms alone; ~14 ms beside thirty 5k-token sequences). A static split — and the pool
before this — leaves each engine's share where it landed: once most engines are idle, the step's last samples
still decode several to an engine, sharing its steps. With nothing left to dispatch (the pool's queue is
empty), :func:`plan_spread` moves calls off the engine decoding the most sequences while idle engines remain to
take their sequences, one each. The dispatcher ends each call engine-side (vLLM's ``/abort_requests``: it
answers with the tokens so far) and its unfinished samples continue from their tokens, each alone
(``Unit.spread``: never packed), on the idle engines — a re-prefill, ~10x cheaper per token than decode on an
H100. A call moves at most once: moved work is never moved again, so the tail cannot chase itself round the
fleet. Engines that cannot end a call engine-side offer no call (``movable``): a moved sample that starts over
would lengthen the tail, not shorten it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TailShare", "plan_spread"]

MIN_CROWD = 2  # sequences decoding on an engine before one of them is worth moving to an idle one


@dataclass(frozen=True)
class TailShare:
    """What :func:`plan_spread` sees of one engine."""

    index: int
    running: int  # sequences decoding there (its /metrics; the samples the pool has on it when unknown)
    inflight: int  # samples the pool has on it (0: idle)
    movable: int  # calls on it that may still move (never moved, endable engine-side)
    calls: int = 1  # calls on it in all: a call holds about running / calls of its sequences
    healthy: bool = True
    slow: bool = False  # a straggler: it takes no moved work (plan_moves empties it instead)


def plan_spread(engines: Sequence[TailShare], backlog: int) -> dict[int, int]:
    """``{engine: calls to move}``: calls off the engine decoding the most sequences (at least :data:`MIN_CROWD`)
    at each point, while idle engines remain for their sequences — one each: a call is reckoned to hold
    ``running / calls`` of its engine's sequences (a non-streamed call's finished samples are not known apart).
    Empty while work waits in the pool (routing fills idle engines then) or no engine is idle."""
    if backlog > 0:
        return {}
    idle = sum(1 for e in engines if e.healthy and not e.slow and e.inflight == 0)
    crowded = [(-e.running, e.index, e.movable, max(1, e.calls)) for e in engines
               if e.healthy and e.running >= MIN_CROWD and e.movable > 0]
    heapq.heapify(crowded)
    moves: dict[int, int] = {}
    while idle > 0 and crowded:
        neg, i, movable, calls = heapq.heappop(crowded)
        holds = -(neg // calls)  # ceil(running / calls)
        if holds > idle:
            continue  # its calls hold more sequences than idle engines remain: a smaller one may still fit
        moves[i] = moves.get(i, 0) + 1
        idle -= holds
        if -neg - holds >= MIN_CROWD and movable > 1:
            heapq.heappush(crowded, (neg + holds, i, movable - 1, calls - 1))
    return moves
