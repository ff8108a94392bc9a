"""Where each affinity key's requests went, and how many of its samples are in flight there.

An affinity key (``Request.affinity``: a GRPO group whose samples come one by one, as verl sends them;
a multi-turn session) has a *home*: the engine its first request went to, whose prefix cache holds its
prompt. A request may carry several keys (a session's id, then its group's prompt): the first key with a
home decides, and every key without one takes the engine the request went to.
:func:`rollout_plugin.pool.policy.routing.pick_near` decides; this only remembers.

The map is bounded: at most ``max_keys`` homes (the least recently placed go first), a home unused for
``ttl_s`` expires (trainers such as verl 0.9.1 never say a session ended: it releases its server per turn
and reuses one request id per session), and :meth:`Affinity.end` frees a session's home at once. A key whose
home engine went away (dead, restarting, stale) moves to where its next request went (``rehome``), one key at
a time: the rest of the map stays. Time is handed in (``now``): no clock is read here.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["Affinity", "Keys"]

Keys = tuple[str, ...]


def keys_of(affinity: str | Keys) -> Keys:
    return (affinity,) if isinstance(affinity, str) else tuple(affinity)


class Affinity:
    """Homes of affinity keys: LRU-bounded to ``max_keys``, expired ``ttl_s`` after their last placement
    (never while samples of the key run on its home; ``None``: never)."""

    def __init__(self, max_keys: int = 100_000, ttl_s: float | None = None):
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self._home: OrderedDict[str, int] = OrderedDict()  # least recently placed first
        self._used: dict[str, float] = {}  # when each key was last placed: non-decreasing in _home's order
        self._on_home: dict[str, int] = {}  # samples of the key in flight on its home
        self.moved = 0  # requests sent away from their home (the imbalance gate opened)
        self.rehomed = 0  # requests whose home had gone away: their keys moved with them
        self.expired = 0  # homes dropped after ttl_s unused
        self.evicted = 0  # homes dropped for max_keys

    def __len__(self) -> int:
        return len(self._home)

    def home(self, affinity: str | Keys, now: float | None = None) -> tuple[int | None, int]:
        """(home engine or None, the key's samples in flight there), from the first key that has a home
        (at ``now``, one past its TTL has none)."""
        for key in keys_of(affinity):
            home = self._home.get(key)
            if home is not None and not (now is not None and self._stale(key, now)):
                return home, self._on_home.get(key, 0)
        return None, 0

    def placed(self, affinity: str | Keys, engine: int, samples: int, now: float = 0.0,
               rehome: bool = False) -> None:
        """``samples`` of ``affinity`` went to ``engine`` at ``now``. ``rehome``: the home they would have gone
        to is gone (its cache with it), so the keys homed there move to ``engine``."""
        self.expire(now)
        keys = keys_of(affinity)
        home, _ = self.home(keys, now)
        if home is not None and home != engine:
            if rehome:
                self.rehomed += 1
            else:
                self.moved += 1  # split off: the keys' homes stay where their prefixes are
        for key in keys:
            current = self._home.get(key)
            if current is not None and current != engine and not (rehome and current == home):
                continue
            if current != engine:
                self._on_home.pop(key, None)  # samples left on the old home are no longer counted here
            self._home[key] = engine
            self._home.move_to_end(key)
            self._used[key] = now
            self._on_home[key] = self._on_home.get(key, 0) + samples
        while len(self._home) > self.max_keys:
            self._drop(next(iter(self._home)))
            self.evicted += 1

    def left(self, affinity: str | Keys, engine: int, samples: int) -> None:
        for key in keys_of(affinity):
            if self._home.get(key) == engine and key in self._on_home:
                self._on_home[key] -= samples
                if self._on_home[key] <= 0:
                    del self._on_home[key]

    def expire(self, now: float) -> int:
        """Drop homes unused for more than ``ttl_s`` at ``now`` (oldest first: O(1) per home dropped); a key
        with samples running on its home counts as used now. Returns how many were dropped."""
        if self.ttl_s is None:
            return 0
        dropped = 0
        while self._home:
            key = next(iter(self._home))
            if now - self._used[key] <= self.ttl_s:
                break
            if key in self._on_home:  # still running: in use, not expired
                self._home.move_to_end(key)
                self._used[key] = now
                continue
            self._drop(key)
            dropped += 1
        self.expired += dropped
        return dropped

    def end(self, key: str) -> bool:
        """A session ended: its key's home is freed now. False if it had none (expired, evicted, never placed)."""
        if key not in self._home:
            return False
        self._drop(key)
        return True

    def clear(self) -> int:
        """Forget every home (verl's ``clear_sticky_cache``: rebalance from scratch); returns how many."""
        count = len(self._home)
        self._home.clear()
        self._used.clear()
        self._on_home.clear()
        return count

    def forget(self, engine: int) -> None:
        """An engine left rotation for good: keys homed there start afresh."""
        for key in [k for k, e in self._home.items() if e == engine]:
            self._drop(key)

    def _stale(self, key: str, now: float) -> bool:
        return self.ttl_s is not None and now - self._used[key] > self.ttl_s and key not in self._on_home

    def _drop(self, key: str) -> None:
        del self._home[key]
        del self._used[key]
        self._on_home.pop(key, None)
