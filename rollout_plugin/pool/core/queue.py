"""The waiting side of the ledger: units queued for admission, oldest first, O(log N) per admission.

Units that may share one call (same prompt kind, ``n`` and sampling params) share a *pack key*; each
key keeps a FIFO deque. A heap per ``n`` holds each key's head, ordered retries-first, then by *epoch*,
then longest ``max_tokens`` first, then by submission order, so the first unit that fits a given room is
found in O(B log N) (B: distinct ``n`` values waiting, a handful) whatever the number of distinct params —
a per-request ``seed`` makes every request its own key. Stale heap entries (a head that left) are dropped
lazily.

An epoch is everything queued between two admission rounds (a step's burst of requests, submitted before
the dispatcher runs again): within it the predicted-long go first (Seer's lesson: a step ends with its
longest sample, so it must start at once, not behind the burst's short ones — on the real CPU pair the
longest group started up to ~80 engine steps late in FIFO order); across epochs the order stays FIFO, so
later long work never overtakes waiting short work. Equal ``max_tokens`` (an RL step's usual case) keep FIFO.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout_plugin.pool.core.ledger import Unit

__all__ = ["UnitQueue"]


class UnitQueue:
    """FIFO across pack keys; compatible units ride together. Counts are kept here, nowhere else."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, deque[Unit]] = {}
        # n -> heap of (rank, token, key); only the entry whose token is _token[key] is live
        self._heads: dict[int, list[tuple[tuple[int, int, int, int], int, tuple]]] = {}
        self._token: dict[tuple, int] = {}
        self._tokens = 0
        self._aside: list[tuple[int, tuple]] = []  # (n, heap entry) held out of one admission round
        self._aside_keys: set[tuple] = set()
        self.samples_by_key: dict[tuple, int] = {}
        self.size = 0  # units waiting
        self.samples = 0  # samples waiting
        self._n_count: dict[int, int] = {}  # units waiting per n (for the largest pending n)
        self._epoch = 0  # the admission round units queued now belong to
        self._fresh = False  # units queued since the last take: the next take closes their epoch

    # -- membership ------------------------------------------------------------------------------
    def push(self, unit: Unit, front: bool = False) -> None:
        key = unit.key
        q = self._by_key.get(key)
        if q is None:
            q = self._by_key[key] = deque()
        else:
            unit.share_key(next(iter(q)).key)  # one key object per pack key: dict lookups hit on identity
        if unit.epoch is None:  # a requeued unit keeps its first epoch (its age)
            unit.epoch, self._fresh = self._epoch, True
        if front:
            q.appendleft(unit)
        else:
            q.append(unit)
        if q[0] is unit:
            self._push_head(key, unit)
        self.samples_by_key[key] = self.samples_by_key.get(key, 0) + unit.n
        self.size += 1
        self.samples += unit.n
        self._n_count[unit.n] = self._n_count.get(unit.n, 0) + 1

    def discard(self, unit: Unit) -> None:
        """A queued unit leaves without being taken (its ticket resolved): counts now, the deque entry lazily."""
        self._count_out(unit)
        unit.queued = False

    def take(self, key: tuple) -> Unit:
        """The head unit of ``key`` (which must be live: :meth:`head` returned it)."""
        if self._fresh:  # an admission round takes: what queues from now on is a later epoch
            self._epoch, self._fresh = self._epoch + 1, False
        q = self._by_key[key]
        unit = q.popleft()
        self._count_out(unit)
        unit.queued = False
        self._settle(key, headless=True)
        return unit

    def head(self, key: tuple) -> Unit | None:
        self._settle(key)
        q = self._by_key.get(key)
        return q[0] if q else None

    # -- ordering --------------------------------------------------------------------------------
    def oldest(self, below_n: int | None = None) -> tuple | None:
        """The key whose head goes first (retries first, then the oldest epoch, longest first within it) among
        units with ``n < below_n`` (any n if None)."""
        best: tuple | None = None
        for n in list(self._heads):
            if below_n is not None and n >= below_n:
                continue
            top = self._top(n)
            if top is not None and (best is None or top[0] < best[0]):
                best = top
        return best[2] if best is not None else None

    def set_aside(self, key: tuple) -> None:
        """Hold ``key`` out of :meth:`oldest` until :meth:`restore` (it cannot go this round)."""
        self._aside_keys.add(key)

    def restore(self) -> None:
        for n, entry in self._aside:
            heapq.heappush(self._heads[n], entry)
        self._aside.clear()
        self._aside_keys.clear()

    def largest_n(self) -> int:
        return max((n for n, c in self._n_count.items() if c > 0), default=0)

    def units(self) -> Iterator[Unit]:
        """Every live queued unit (for close and invariant checks)."""
        for q in self._by_key.values():
            yield from (u for u in q if u.queued)

    def count(self, predicate: Callable[[Unit], bool]) -> int:
        return sum(1 for u in self.units() if predicate(u))

    # -- internals -------------------------------------------------------------------------------
    def _count_out(self, unit: Unit) -> None:
        key = unit.key
        self.samples_by_key[key] -= unit.n
        if not self.samples_by_key[key]:
            del self.samples_by_key[key]
        self.size -= 1
        self.samples -= unit.n
        self._n_count[unit.n] -= 1

    def _settle(self, key: tuple, headless: bool = False) -> None:
        """Drop dead heads of ``key``'s deque; give the live head a heap entry if it changed (or has none)."""
        q = self._by_key.get(key)
        if q is None:
            return
        changed = headless
        while q and not q[0].queued:
            q.popleft()
            changed = True
        if not q:
            del self._by_key[key]
            self._token.pop(key, None)
        elif changed:
            self._push_head(key, q[0])

    def _push_head(self, key: tuple, unit: Unit) -> None:
        self._tokens += 1
        self._token[key] = self._tokens  # any older entry of this key is stale from now on
        rank = (unit.retry_priority, unit.epoch, -unit.request.sampling.max_tokens, unit.seq)
        heapq.heappush(self._heads.setdefault(unit.n, []), (rank, self._tokens, key))

    def _top(self, n: int) -> tuple | None:
        heap = self._heads[n]
        while heap:
            entry = heap[0]
            key = entry[2]
            if self._token.get(key) != entry[1]:
                heapq.heappop(heap)  # stale: the key was re-headed or emptied since
            elif not self._by_key[key][0].queued:
                self._settle(key)  # its head left: re-head (a new entry) or drop the key
            elif key in self._aside_keys:
                self._aside.append((n, heapq.heappop(heap)))
            else:
                return entry
        return None
