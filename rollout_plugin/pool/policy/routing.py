"""Who gets the next call: pure policy over engine load snapshots (no HTTP, no clocks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EngineLoad", "pack_budget", "pick_engine", "pick_near", "split_group"]


@dataclass(frozen=True)
class EngineLoad:
    index: int
    inflight: int  # samples in flight
    cap: int  # samples allowed in flight
    healthy: bool = True
    speed: float = 1.0  # decode speed against the fleet (pool/policy/straggler.py): a slow engine fills up sooner
    long: int = 0  # known-long samples in flight: > 0 makes it a lane (pool/policy/lanes.py)

    @property
    def room(self) -> int:
        """Samples more it may take; a lane takes none but known-long work (:func:`~.lanes.pick_lane`), so its
        long samples decode in a small batch."""
        return self.cap - self.inflight if self.healthy and not self.long else 0

    @property
    def fill(self) -> float:
        """In-flight ÷ cap, weighed by speed: an engine at a third of the fleet's speed looks three times as
        full, so it gets a third of the new work (its share finishes when the others' does)."""
        return self.inflight / (self.cap * self.speed) if self.cap > 0 and self.speed > 0 else 1.0


def pick_engine(loads: Sequence[EngineLoad], need: int, avoid: frozenset[int] = frozenset()) -> int | None:
    """The least-loaded healthy engine (by in-flight ÷ cap) with room for ``need`` samples.

    Engines in ``avoid`` (where this request already failed) are used only if nothing else fits.
    Ties go to the faster engine (idle engines tie at 0: work moved at a step's end must not land on an
    emptied straggler), then to the lower index so routing is deterministic.
    """
    for skip in (avoid, frozenset()):
        fits = [e for e in loads if e.index not in skip and e.room >= need]
        if fits:
            return min(fits, key=lambda e: (e.fill, -e.speed, e.index)).index
    return None


def split_group(loads: Sequence[EngineLoad], n: int, avoid: frozenset[int], threshold: float) -> list[tuple[int, int]]:
    """Where a GRPO group of ``n`` samples goes: ``[(engine, samples), ...]``; ``[]``: nowhere yet.

    One entry keeps the group on one engine (one ``n=k`` request: the prompt is prefilled once and
    the siblings share its KV blocks). The group is split only when that would-be engine — or, when
    no engine has room for the whole group, the fullest engine — is filled above the least-filled
    engine by more than ``threshold`` (a share of the cap): then its samples go to the least-filled
    engines first, in as few pieces as their room allows. A small gap means the engines are evenly
    busy and the group waits for room on one of them instead of losing its shared prefix.
    """
    whole = pick_engine(loads, n, avoid)
    usable = [e for e in loads if e.room > 0 and e.index not in avoid] or [e for e in loads if e.room > 0]
    if not usable:
        return []
    least = min(usable, key=lambda e: (e.fill, e.index))
    ref = loads[whole].fill if whole is not None else max(e.fill for e in loads if e.healthy)
    if ref - least.fill <= threshold or sum(e.room for e in usable) < n:
        return [(whole, n)] if whole is not None else []
    parts, left = [], n
    for e in sorted(usable, key=lambda e: (e.fill, e.index)):
        take = min(e.room, left)
        parts.append((e.index, take))
        left -= take
        if not left:
            break
    return parts


def pick_near(loads: Sequence[EngineLoad], need: int, avoid: frozenset[int], home: int | None, home_own: int,
              threshold: float) -> int | None:
    """The engine for a request with affinity: its ``home`` (where the key's last request went: the prefix
    is cached there), waiting for room there if need be, while ``home`` — filled without the key's own
    ``home_own`` samples — is no more than ``threshold`` (a share of the cap) above the least-filled engine
    with room, and its samples in flight (with this one's) no more than ``1 + threshold`` times the fleet's
    mean (bounded-load consistent hashing, Mirrokni et al. 2018: with caps far above what runs — KV to spare —
    the cap-share gap alone let whole groups of sessions pile onto one CPU engine, 24 vs 8, each of them
    decoding in the bigger batch); past either bound, the least-loaded engine (:func:`pick_engine`).
    ``None``: wait."""
    least = pick_engine(loads, need, avoid)
    # A home in ``avoid`` (the request was cut there: the engine died, or a straggler move took it off) is
    # no home for this request: going back would undo the move, and the next move would send it back again.
    # A lane (known-long work decoding in a small batch) takes nothing else: no home either.
    if home is None or home >= len(loads) or home in avoid or not loads[home].healthy or loads[home].long \
            or least is None:
        return least
    h = loads[home]
    base = (h.inflight - home_own) / h.cap if h.cap > 0 else float("inf")
    if base - loads[least].fill > threshold or _over_bound(loads, h, home_own, need, loads[least], threshold):
        return least
    return home if h.room >= need else None


def _over_bound(loads: Sequence[EngineLoad], home: EngineLoad, home_own: int, need: int, least: EngineLoad,
                eps: float) -> bool:
    """``home`` would run more than ``1 + eps`` times the mean samples in flight (counted with ``need``), and
    more than ``least`` does by over ``need`` (no move for a difference of one request)."""
    live = [e for e in loads if e.healthy and not e.long]
    if not live:
        return False
    mean = (sum(e.inflight for e in live) + need) / len(live)
    others = home.inflight - home_own
    return others + need > (1 + eps) * mean and others > least.inflight + need


def pack_budget(room: int, pack_size: int) -> int:
    """Samples the next call to an engine may carry: one pack, never above the engine's room."""
    return max(0, min(room, pack_size))
