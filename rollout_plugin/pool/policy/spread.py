"""Spreading a step's tail: at a step's end, idle engines take calls off crowded ones (pure).

A step ends with its longest samples, and a sample's decode step is slower the more context its batch holds
(the H100 profile: 6.2 ms alone; ~14 ms beside thirty 5k-token sequences). A static split — and the pool
before this — leaves each engine's share where it landed: once most engines are idle, the step's last samples
still decode several to an engine, sharing its steps. With nothing left to dispatch (the pool's queue is
empty), :func:`plan_spread` moves calls off the engine decoding the most sequences to the idle engines, one
sequence to each. Past one each, a sequence sharing an idle engine with others gains only where a decode step
costs less with fewer sequences: not on an H100 near the tail (a step is ~6 ms whatever a few sequences hold),
but on a CPU engine (a step is nearly all per-sequence work) it is the whole gain — a pair has one idle engine
for its busy twin's dozens of tail sequences. So the fleet's step time is measured against batch size
(:func:`fit_step`, from vLLM's step histograms at the monitor's looks); where a crowded engine's batch is
batch-bound (:func:`batch_bound`), its calls move until the idle engines hold as many as it keeps, and never more
than their caps (without the caps a KV-starved idle engine was handed an even split it could not hold: a 25 s
step for static's 15 s, benchmarks/RESULTS.md session 12). The dispatcher ends each call engine-side (vLLM's
``/abort_requests``: it
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

__all__ = ["StepFit", "TailShare", "batch_bound", "fit_step", "plan_spread"]

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
    batch_bound: bool = False  # its decode step is measured to shrink markedly with its batch (:func:`batch_bound`)
    cap: int | None = None  # samples it may hold (its controller's cap): an idle engine takes no more


def plan_spread(engines: Sequence[TailShare], backlog: int) -> dict[int, int]:
    """``{engine: calls to move}``: calls off the engine decoding the most sequences (at least :data:`MIN_CROWD`)
    at each point. A call is reckoned to hold ``running / calls`` of its engine's sequences (a non-streamed call's
    finished samples are not known apart); they land one by one on the least loaded idle engines, as routing
    places them. A call moves while each engine it lands on holds one sequence — or, from a batch-bound engine, no
    more than that engine still decodes (the busiest gets lighter, none becomes the new busiest) — and no idle
    engine goes past its cap. Empty while work waits in the pool (routing fills idle engines then) or no engine is
    idle."""
    if backlog > 0:
        return {}
    # The idle engines as a heap of (load, cap): a KV-starved engine takes only what its cap holds.
    loads = [(0, e.cap if e.cap is not None else 1 << 30) for e in engines
             if e.healthy and not e.slow and e.inflight == 0]
    crowded = [(-e.running, e.index, e.movable, max(1, e.calls)) for e in engines
               if e.healthy and e.running >= MIN_CROWD and e.movable > 0]
    heapq.heapify(crowded)
    shares = {e.index: e for e in engines}
    moves: dict[int, int] = {}
    while loads and crowded:
        neg, i, movable, calls = heapq.heappop(crowded)
        holds = -(neg // calls)  # ceil(running / calls)
        landed = _land(loads, holds, room=max(1, -neg - holds) if shares[i].batch_bound else 1)
        if landed is None:
            continue  # its calls hold too many sequences for the room left: a smaller one may still fit
        loads = landed
        moves[i] = moves.get(i, 0) + 1
        if -neg - holds >= MIN_CROWD and movable > 1:
            heapq.heappush(crowded, (neg + holds, i, movable - 1, calls - 1))
    return moves


def _land(loads: list[tuple[int, int]], holds: int, room: int) -> list[tuple[int, int]] | None:
    """The idle engines' (load, cap) heap once ``holds`` sequences land one by one on the least loaded with space
    (at most ``room`` and its cap); None if they do not all fit."""
    out, full = list(loads), []
    for _ in range(holds):
        while out and out[0][0] + 1 > min(room, out[0][1]):
            full.append(heapq.heappop(out))
        if not out:
            return None
        load, cap = out[0]
        heapq.heapreplace(out, (load + 1, cap))
    out += full
    heapq.heapify(out)
    return out


@dataclass(frozen=True)
class StepFit:
    """The fleet's decode step against batch size: the measured windows with the largest and the smallest batch
    (one model on every engine: a step's cost per sequence is the fleet's, whichever engine showed it)."""

    large: tuple[float, float] | None = None  # (sequences, seconds per step)
    small: tuple[float, float] | None = None


def fit_step(fit: StepFit, batch: float, step_s: float) -> StepFit:
    """Add one measured window: engine steps of ``batch`` sequences on average, each taking ``step_s`` seconds
    (telemetry.step_point). Windows without decoding add nothing."""
    if batch < 1 or step_s <= 0:
        return fit
    point = (batch, step_s)
    large = point if fit.large is None or batch >= fit.large[0] else fit.large
    small = point if fit.small is None or batch <= fit.small[0] else fit.small
    return StepFit(large, small)


BATCH_SPAN = 2.0  # the largest batch measured must be this many times the smallest for a fit


def batch_bound(fit: StepFit, running: int) -> bool:
    """Does halving a batch of ``running`` sequences make its step markedly shorter? Step time fitted as
    ``a + b × batch`` through the largest and the smallest batch measured: yes where the per-sequence part
    ``b × running`` is at least the fixed part ``a`` (half the batch then cuts the step by a quarter or more).
    Unknown: no."""
    if fit.large is None or fit.small is None or fit.large[0] < BATCH_SPAN * fit.small[0]:
        return False
    (n1, s1), (n0, s0) = fit.large, fit.small
    per_seq = (s1 - s0) / (n1 - n0)
    return per_seq > 0 and per_seq * running >= s0 - per_seq * n0
