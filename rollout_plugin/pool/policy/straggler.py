"""Straggler-aware placement: how fast each engine decodes against the fleet, and what to move off slow ones (pure).

Two decisions, snapshots in, numbers out (no I/O, no clock):

- :func:`judge_speeds`: each engine's speed relative to the fleet, from its tokens/s per running sequence
  (the inverse of its step time). A larger batch or longer contexts make any engine's step longer, so an
  engine is compared only with engines running at least as many sequences (not far more: their longer steps
  would flatter it) and holding at least as much KV cache: if they still decode each sequence faster, it is
  slow. The verdict is smoothed (``decay``) and kept while nothing comparable is measured
  (a slow engine that was emptied keeps its verdict). Routing weighs an engine's fill by its speed
  (:mod:`rollout_plugin.pool.policy.routing`), so a straggler gets a share of new work in proportion to its speed.
- :func:`plan_moves`: with nothing left to dispatch (the pool's queue is empty: the step's end), the work on
  slow engines moves to the others while they have room for it. A share in proportion to speed is not
  enough: a step ends with its longest sample, and a straggler decodes that one ``1/speed`` times slower
  whatever else it runs. The dispatcher cuts the newest calls first (least progress to lose); the samples
  continue from their tokens when the client reports them (streamed calls), else start over — cheap when
  the straggler was found early. A healthy fleet has no slow engine: nothing moves, and routing is the
  least-filled rule it was.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EngineRate", "EngineShare", "MIN_RUNNING", "judge_speeds", "plan_moves"]

MIN_RUNNING = 4  # fewer running sequences: a step is mostly fixed cost, its speed says little
MIN_PEERS = 3  # comparable engines needed for a verdict
PEER_SPAN = 1.5  # peers run up to this many times the sequences: far busier ones would flatter a straggler
MAX_PEERS = 32  # a median of this many is steady enough


@dataclass(frozen=True)
class EngineRate:
    """One engine's last fresh measurement: output tokens/s over the window and the sequences it ran."""

    index: int
    tokens_per_s: float | None
    running: int | None
    healthy: bool = True
    kv_usage: float | None = None  # 0..1: the context it holds (unknown: not compared on it)


@dataclass(frozen=True)
class EngineShare:
    """What :func:`plan_moves` sees of one engine: its speed verdict (1.0: as fast as the fleet) and load."""

    index: int
    speed: float
    inflight: int
    cap: int
    healthy: bool = True


def _per_seq(r: EngineRate) -> float | None:
    if not r.healthy or r.tokens_per_s is None or r.running is None or r.running < MIN_RUNNING:
        return None
    return r.tokens_per_s / r.running


def judge_speeds(prev: Sequence[float], rates: Sequence[EngineRate], decay: float = 0.5) -> list[float]:
    """Each engine's speed in (0, 1] after this round (``prev``: the last verdicts, 1.0 for unknown).

    Engine ``i``'s sample: its tokens/s per running sequence over the median of its peers' — engines running 1
    to ``PEER_SPAN`` times as many sequences with at least as much KV in use, ``MIN_PEERS`` of them at least
    (``MAX_PEERS`` spread over that range: O(N) a round at 10³ engines) — capped at 1 (faster than its peers is
    not news: they run more). Smoothed: ``decay`` × the new sample + the rest × the old."""
    per = [_per_seq(r) for r in rates]
    out = list(prev) + [1.0] * (len(rates) - len(prev))
    ranked = sorted((rates[j].running, j) for j in range(len(rates)) if per[j] is not None)
    running = [r for r, _ in ranked]
    for i, r in enumerate(rates):
        if per[i] is None:
            continue
        lo, hi = bisect.bisect_left(running, r.running), bisect.bisect_right(running, PEER_SPAN * r.running)
        stride = max(1, (hi - lo) // MAX_PEERS)
        peers = [per[j] for _, j in ranked[lo:hi:stride] if j != i
                 and (r.kv_usage is None or rates[j].kv_usage is None or rates[j].kv_usage >= r.kv_usage)]
        if len(peers) < MIN_PEERS:
            continue
        ref = statistics.median(peers)
        if ref <= 0:
            continue
        sample = min(1.0, per[i] / ref)
        out[i] = max(0.01, decay * sample + (1 - decay) * out[i])
    return out


def plan_moves(engines: Sequence[EngineShare], backlog: int, slow_below: float = 0.75) -> dict[int, int]:
    """``{engine: samples to move}`` off engines slower than ``slow_below`` × the fleet, slowest first, as far as
    the other engines' room takes them; empty while work waits in the pool (routing's turn) or none is slow."""
    if backlog > 0:
        return {}
    room = sum(max(0, e.cap - e.inflight) for e in engines if e.healthy and e.speed >= slow_below)
    moves: dict[int, int] = {}
    for e in sorted(engines, key=lambda e: (e.speed, e.index)):
        if not e.healthy or e.speed >= slow_below or e.inflight <= 0 or room <= 0:
            continue
        moves[e.index] = min(e.inflight, room)
        room -= moves[e.index]
    return moves

