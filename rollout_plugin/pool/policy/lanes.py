"""Lanes for known-long samples: where a sample known to be long decodes, so it finishes in time (pure).

Under a staleness bound a sample must finish within about two weight updates of its start. A long answer
decoding in a loaded batch cannot (a step of ~25 ms at 256 running sequences on the H100 profile: 16k tokens
take ~400 s); at the update where its tokens become too old it starts over, and the step that waits for it
waits for a whole decode (Seer's lesson: place long requests apart). A sample that started over is *known
long* (the mark lives on its unit, :attr:`rollout_plugin.pool.core.ledger.Unit.long`), and so are its group's
finished siblings generated again with it (their prompt drew an answer that outlived the bound): it goes to a *lane*,
an engine that runs known-long samples only, at most :data:`LANE_SEQS` of them, so each decode step stays
small. A lane is an ordinary engine again once its last known-long sample ends; until then routing gives it
no other work (:attr:`~.routing.EngineLoad.room` is 0). A lane costs its engine's throughput while it runs, so a
fleet of fewer than :data:`LANE_MIN_FLEET` healthy engines has none: on a pair, two lanes left the pool running
one to four samples for minutes while the rest waited (benchmarks/RESULTS.md, session 9). There a known-long
sample runs as ordinary work (:func:`lane_to_spare`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rollout_plugin.pool.policy.routing import EngineLoad

__all__ = ["LANE_MIN_FLEET", "LANE_SEQS", "lane_to_spare", "pick_lane"]

# Known-long samples one lane runs at once. From the step model (sim/profiles/h100_llama8b.json: 6.2 ms a step
# plus 23 µs a sequence plus 51 ns a token of context): a sequence at ~9k tokens of context adds ~0.5 ms, so
# four keep a step near 8 ms and a 16,384-token answer near 135 s, inside two updates of ~70 s.
LANE_SEQS = 4
# A fleet of fewer healthy engines has no lanes: there one lane is a third or more of the throughput, and every
# engine may become one (a pair did: RESULTS.md, session 9). Larger fleets are not capped: a share cap (one lane in
# two or four engines) cost the simulated 64-engine multi-step run 9 % on seed 2, where the last step's known-long
# samples need more lanes than that while the rest of the fleet idles.
LANE_MIN_FLEET = 4


def lane_to_spare(loads: Sequence[EngineLoad]) -> bool:
    """May a lane open? Only on a fleet of at least :data:`LANE_MIN_FLEET` healthy engines."""
    return sum(1 for e in loads if e.healthy) >= LANE_MIN_FLEET


def pick_lane(loads: Sequence[EngineLoad], need: int, avoid: frozenset[int] = frozenset(),
              lane_seqs: int = LANE_SEQS) -> int | None:
    """The engine for a known-long unit of ``need`` samples; ``None``: it waits.

    A lane with room (its in-flight samples, known-long or still draining, plus ``need`` within
    ``lane_seqs``) first, the fullest such lane first so lanes stay few; else a new lane on the engine with
    the fewest samples in flight for its speed (a slow engine is no lane: its steps are longer) and room for
    ``need``, while the fleet has a lane to spare (:func:`lane_to_spare`). Engines in ``avoid`` are used only if
    nothing else fits; ties go to the lower index.
    """
    spare = lane_to_spare(loads)
    for skip in (avoid, frozenset()):
        ok = [e for e in loads if e.healthy and e.index not in skip]
        lanes = [e for e in ok if e.long and e.inflight + need <= max(lane_seqs, need)]
        if lanes:
            return min(lanes, key=lambda e: (-e.long, e.index)).index
        fresh = [e for e in ok if e.room >= need] if spare else []
        if fresh:
            return min(fresh, key=lambda e: ((e.inflight + need) / max(e.speed, 1e-9), e.index)).index
    return None
