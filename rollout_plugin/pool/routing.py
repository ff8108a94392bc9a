"""Who gets the next call: pure policy over engine load snapshots (no HTTP, no clocks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    index: int
    inflight: int  # samples in flight
    cap: int  # samples allowed in flight
    healthy: bool = True

    @property
    def room(self) -> int:
        return self.cap - self.inflight if self.healthy else 0


def pick_engine(loads: Sequence[EngineLoad], need: int, avoid: frozenset[int] = frozenset()) -> int | None:
    """The least-loaded healthy engine (by in-flight ÷ cap) with room for ``need`` samples.

    Engines in ``avoid`` (where this request already failed) are used only if nothing else fits.
    Ties go to the lower index so routing is deterministic.
    """
    for skip in (avoid, frozenset()):
        fits = [e for e in loads if e.index not in skip and e.room >= need]
        if fits:
            return min(fits, key=lambda e: (e.inflight / e.cap, e.index)).index
    return None


def pack_budget(room: int, pack_size: int) -> int:
    """Samples the next call to an engine may carry: one pack, never above the engine's room."""
    return max(0, min(room, pack_size))
