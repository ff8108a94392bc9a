"""The pool's queue of pending requests: FIFO across pack keys, compatible requests ride together."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field, replace

from rollout_plugin.types import Request, Result


@dataclass
class Pending:
    request: Request
    future: asyncio.Future[Result]
    seq: int
    attempts: int = 0
    avoid: frozenset[int] = frozenset()
    solo: bool = False  # sent alone after a packed call was rejected
    join: GroupJoin | None = None  # set on the pieces of a split GRPO group
    part: int = 0  # this piece's place in its group
    queued_at: float = 0.0  # when it was submitted (the pack timeout counts from here)

    def piece(self, join: GroupJoin, part: int, n: int) -> Pending:
        """A piece of this (group) request: same id and waiter, ``n`` of its samples."""
        return Pending(replace(self.request, n=n), self.future, self.seq, self.attempts, self.avoid,
                       join=join, part=part, queued_at=self.queued_at)

    @property
    def key(self) -> tuple:
        r = self.request
        # Only requests with one prompt kind, one n and one set of sampling params share a call
        # (chat requests queue together too, but go one per call: the chat API takes one conversation).
        return ("solo", self.seq) if self.solo else (r.kind, r.n, r.sampling)


class GroupJoin:
    """Collects the pieces of a split group into the one :class:`Result` its id is owed."""

    def __init__(self, parent: Pending, parts: int):
        self.parent = parent
        self.results: list[Result | None] = [None] * parts
        self.done = False

    def add(self, part: int, result: Result) -> Result | None:
        """The group's result once every piece is in (or the first error); ``None`` until then."""
        if self.done:
            return None
        self.results[part] = result
        if not result.ok:
            self.done = True
            return replace(result, request=self.parent.request)
        if any(r is None for r in self.results):
            return None
        self.done = True
        parts = [r for r in self.results if r is not None]
        engines = list(dict.fromkeys(r.engine for r in parts if r.engine))
        return Result(id=self.parent.request.id, samples=tuple(s for r in parts for s in r.samples),
                      prompt_tokens=parts[0].prompt_tokens, engine="+".join(engines),
                      latency_s=max(r.latency_s for r in parts), attempts=max(r.attempts for r in parts),
                      # the oldest weights any sample came from: staleness is bounded by the worst piece
                      weight_version=min(r.weight_version for r in parts), request=self.parent.request)


@dataclass
class PendingQueue:
    """FIFO across pack keys: the oldest request goes first, compatible ones ride along."""

    by_key: dict[tuple, deque[Pending]] = field(default_factory=dict)
    samples_by_key: dict[tuple, int] = field(default_factory=dict)
    size: int = 0
    samples: int = 0

    def push(self, item: Pending, front: bool = False) -> None:
        key = item.key
        q = self.by_key.setdefault(key, deque())
        q.appendleft(item) if front else q.append(item)
        self.samples_by_key[key] = self.samples_by_key.get(key, 0) + item.request.n
        self.size += 1
        self.samples += item.request.n

    def oldest_key(self, skip: set[tuple] | frozenset[tuple] = frozenset()) -> tuple | None:
        heads = [(q[0].seq if not q[0].attempts else -1, k) for k, q in self.by_key.items() if q and k not in skip]
        return min(heads, key=lambda h: h[0])[1] if heads else None

    def pop(self, key: tuple) -> Pending:
        q = self.by_key[key]
        item = q.popleft()
        if q:
            self.samples_by_key[key] -= item.request.n
        else:
            del self.by_key[key]
            del self.samples_by_key[key]
        self.size -= 1
        self.samples -= item.request.n
        return item

    def peek(self, key: tuple) -> Pending | None:
        q = self.by_key.get(key)
        return q[0] if q else None

    def drain(self) -> list[Pending]:
        items = [p for q in self.by_key.values() for p in q]
        self.by_key.clear()
        self.samples_by_key.clear()
        self.size = self.samples = 0
        return items
