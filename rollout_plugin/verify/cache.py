"""A bounded result cache for verifiers, keyed by (verifier, mode, prompt, example, completion).

GRPO groups often repeat a completion (short answers, low temperature); a remote or CPU-heavy
verifier should not pay twice. Keys are 16-byte digests, so the bound is on entries, not on
the size of the texts; the least recently used entry goes first.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any


def cache_key(verifier: str, mode: str, prompt: Any, example: dict[str, Any], completion: str) -> bytes:
    # The example's fields (the answer) take part: two datasets may share a prompt with different answers.
    blob = json.dumps([verifier, mode, prompt, example, completion], sort_keys=True, default=str,
                      ensure_ascii=False)
    return hashlib.blake2b(blob.encode(), digest_size=16).digest()


class VerifyCache:
    """LRU of ``key -> reward``; ``size=0`` caches nothing. Errors are never cached (they may be transient)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[bytes, float] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> float | None:
        if not self.size:
            return None
        reward = self._items.get(key)
        if reward is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return reward

    def put(self, key: bytes, reward: float) -> None:
        if not self.size:
            return
        self._items[key] = reward
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
