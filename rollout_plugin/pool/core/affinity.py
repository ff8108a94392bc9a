"""Where each affinity key's requests went, and how many of its samples are in flight there.

An affinity key (``Request.affinity``: a GRPO group whose samples come one by one, as verl sends them;
a multi-turn session) has a *home*: the engine its first request went to, whose prefix cache holds its
prompt. A request may carry several keys (a session's id, then its group's prompt): the first key with a
home decides, and every key without one takes the engine the request went to.
:func:`rollout_plugin.pool.policy.routing.pick_near` decides; this only remembers (LRU-bounded, like verl's
own sticky-session cache).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["Affinity", "Keys"]

Keys = tuple[str, ...]


def keys_of(affinity: str | Keys) -> Keys:
    return (affinity,) if isinstance(affinity, str) else tuple(affinity)


class Affinity:
    def __init__(self, size: int = 10_000):
        self.size = size
        self._home: OrderedDict[str, int] = OrderedDict()
        self._on_home: dict[str, int] = {}  # samples of the key in flight on its home
        self.moved = 0  # requests sent away from their home (the imbalance gate opened)

    def home(self, affinity: str | Keys) -> tuple[int | None, int]:
        """(home engine or None, the key's samples in flight there), from the first key that has a home."""
        for key in keys_of(affinity):
            home = self._home.get(key)
            if home is not None:
                return home, self._on_home.get(key, 0)
        return None, 0

    def placed(self, affinity: str | Keys, engine: int, samples: int) -> None:
        home, _ = self.home(affinity)
        if home is not None and home != engine:
            self.moved += 1  # split off: the keys' homes stay where their prefixes are
        for key in keys_of(affinity):
            current = self._home.get(key)
            if current is None or current == engine:
                self._home[key] = engine
                self._home.move_to_end(key)
                self._on_home[key] = self._on_home.get(key, 0) + samples
        while len(self._home) > self.size:
            old, _ = self._home.popitem(last=False)
            self._on_home.pop(old, None)

    def left(self, affinity: str | Keys, engine: int, samples: int) -> None:
        for key in keys_of(affinity):
            if self._home.get(key) == engine and key in self._on_home:
                self._on_home[key] -= samples
                if self._on_home[key] <= 0:
                    del self._on_home[key]

    def forget(self, engine: int) -> None:
        """An engine left rotation for good: keys homed there start afresh."""
        for key in [k for k, e in self._home.items() if e == engine]:
            del self._home[key]
            self._on_home.pop(key, None)
