"""The pool's one source of truth for request state: tickets, units, calls — and the one resolve path.

- A :class:`Ticket` per request id, from ``submit`` until :meth:`Ledger.resolve` (exactly once).
- A ticket's work is one or more :class:`Unit` s: the whole request, or the pieces of a split GRPO
  group. A unit is *queued* (in :class:`~rollout_plugin.pool.core.queue.UnitQueue`), *in flight* (in a
  :class:`Call`), *backing off* (a timer will requeue it), or *done*.
- A :class:`Call` is a lease on one engine counted in samples; per-engine and global in-flight counts
  change only when a call starts or ends, here.

Every way a request ends — samples, an error record, the pool failing or closing, the caller giving up —
goes through :meth:`Ledger.resolve`; :meth:`Ledger.check` recomputes every count from the records
(the randomized invariant tests call it).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from rollout_plugin.pool.core.cuts import Cut
from rollout_plugin.pool.core.engine_client import Partial
from rollout_plugin.pool.core.queue import UnitQueue
from rollout_plugin.types import Request, Result, Sample

if TYPE_CHECKING:  # annotations only: the ledger holds the futures and timers, it does no I/O
    import asyncio

__all__ = ["Call", "GroupJoin", "Ledger", "Prefix", "Ticket", "Unit"]


class _Hashed:
    """A value with its hash computed once (a frozen dataclass rehashes every field on every lookup)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: object):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashed) and self._hash == other._hash and self.value == other.value


@dataclass(eq=False, slots=True)
class Ticket:
    request: Request
    future: asyncio.Future[Result]
    seq: int
    queued_at: float
    units: list[Unit] = field(default_factory=list)
    join: GroupJoin | None = None
    resolved: bool = False


@dataclass(eq=False, slots=True)
class Unit:
    ticket: Ticket
    n: int
    seq: int
    part: int | None = None  # a piece of a split group; None: the whole request
    attempts: int = 0
    avoid: frozenset[int] = frozenset()  # engines where it failed: used only if nothing else fits
    solo: bool = False  # sent alone after a packed call was rejected
    requeued: bool = False  # back in the queue after a failure: goes before new work
    queued: bool = False
    call: Call | None = None
    timer: asyncio.TimerHandle | None = None
    done: bool = False
    prefix: Prefix | None = None  # a continued sample (n=1): prompt + these tokens, the rest of its budget
    epoch: int | None = None  # the queue's admission round it first queued in (pool/core/queue.py)
    # Known long: it started over (its tokens outlived the staleness bound), so it goes to a lane of its own
    # kind and before other work (pool/policy/lanes.py). Its pieces inherit it.
    long: bool = False
    # Moved once already to an idle engine at a step's end (Dispatcher.spread_calls): never again, so the same
    # work is not moved round and round. Its pieces inherit it.
    spread: bool = False
    _request: Request | None = None
    _key: tuple | None = None

    @property
    def request(self) -> Request:
        if self.part is None:
            return self.ticket.request
        if self._request is None:
            r = self.ticket.request
            if self.prefix is None:
                self._request = replace(r, n=self.n)
            else:  # the same sample, continued: its prompt and tokens so far as the prompt, its budget left
                sp, done = r.sampling, self.prefix.tokens
                self._request = replace(r, n=1, prompt=[*self.prefix.prompt_ids, *(self.prefix.sample.token_ids or ())],
                                        sampling=replace(sp, max_tokens=sp.max_tokens - done,
                                                         min_tokens=max(0, sp.min_tokens - done)))
        return self._request

    @property
    def key(self) -> tuple:
        if self._key is None:  # computed once: hashing the sampling params is the queue's hot spot
            r = self.request  # a continued sample's own: its prompt is token ids, its budget what is left
            # Only units of one prompt kind, one n and one set of sampling params share a call (chat
            # units queue together too but go one per call: the chat API takes one conversation).
            # Units with an affinity wait for their own engine: they queue by key, apart from others.
            if self.solo:
                self._key = ("solo", self.seq)
            elif self.long:  # goes to a lane, alone: never packed with other work
                self._key = ("long", self.seq, self.part)
            elif self.spread:  # moved off a crowded engine: alone, so the pieces spread over the idle engines
                self._key = ("spread", self.seq, self.part)
            elif r.affinity is not None:
                self._key = ("affinity", r.affinity, r.kind, self.n, _Hashed(r.sampling))
            else:
                self._key = (r.kind, self.n, _Hashed(r.sampling))
        return self._key

    def share_key(self, key: tuple) -> None:
        """Adopt an equal key object already in use (the queue's dicts then match it by identity)."""
        self._key = key

    def mark_spread(self, engine: int) -> None:
        """Moved off ``engine`` at a step's end: it avoids that engine, goes alone, and never moves again."""
        self.spread, self.avoid, self._key = True, self.avoid | {engine}, None

    def make_solo(self) -> None:
        """From now on it goes alone (a packed call with it was rejected)."""
        self.solo, self._key = True, None

    @property
    def alone(self) -> bool:
        """Goes in a call of its own: rejected in a pack before, or a chat (one conversation per call)."""
        return self.solo or self.request.kind == "chat"

    @property
    def retry_priority(self) -> int:
        """Queue order among units of one size: known-long (-2: its time is short) before requeued after a
        failure (-1) before new work (0)."""
        return -2 if self.long else -1 if self.requeued else 0

    @property
    def state(self) -> str:
        if self.done:
            return "done"
        if self.queued:
            return "queued"
        if self.call is not None:
            return "inflight"
        return "backoff" if self.timer is not None else "limbo"


@dataclass(eq=False, slots=True)
class Call:
    """One engine call: a lease of ``samples`` on engine ``engine`` until it ends."""

    engine: int
    units: list[Unit]
    samples: int
    version: int
    started: float
    task: asyncio.Task[None] | None = None
    cancel_reason: Cut | None = None  # set by whoever cancels it: what to do with its units
    progress: list[list[Partial]] | None = None  # what streamed in so far, if the client reports it
    marks: list[tuple[list[list[int]] | None, int]] = field(default_factory=list)  # keep-mode weight updates
    id: str = ""  # the request id the engine knows it by (its abort takes it): unique within the pool
    aborting: bool = False  # an engine-side abort was sent: it answers with the tokens so far


class GroupJoin:
    """Collects the pieces of a split (or continued) group into the one :class:`Result` its id is owed.

    Parts are numbered as they are made; a part that is itself split again is replaced, in place, by its
    own parts, so the samples come back in a stable order."""

    def __init__(self, request: Request):
        self.request = request
        self.order: list[int] = []
        self.results: dict[int, Result | None] = {}
        self._next = 0

    def new_parts(self, count: int, replacing: int | None = None) -> list[int]:
        parts = list(range(self._next, self._next + count))
        self._next += count
        for p in parts:
            self.results[p] = None
        if replacing is None:
            self.order.extend(parts)
        else:
            at = self.order.index(replacing)
            self.order[at:at + 1] = parts
            del self.results[replacing]
        return parts

    def add(self, part: int, result: Result) -> Result | None:
        """The group's result once every piece is in (or the first error); ``None`` until then."""
        self.results[part] = result
        if not result.ok:
            return replace(result, id=self.request.id, request=self.request)
        parts = [self.results[p] for p in self.order]
        if any(r is None for r in parts):
            return None
        done = [r for r in parts if r is not None]
        engines = list(dict.fromkeys(r.engine for r in done if r.engine))
        return Result(id=self.request.id, samples=tuple(s for r in done for s in r.samples),
                      prompt_tokens=done[0].prompt_tokens, engine="+".join(engines),
                      latency_s=max(r.latency_s for r in done), attempts=max(r.attempts for r in done),
                      # the oldest weights any sample came from: staleness is bounded by the worst piece
                      weight_version=min(r.weight_version for r in done), request=self.request)


@dataclass(frozen=True)
class Prefix:
    """The part of one sample generated before its call was cut: the unit carrying it continues from here."""

    prompt_ids: tuple[int, ...]
    sample: Sample  # tokens, logprobs and text so far, with their segments

    @property
    def tokens(self) -> int:
        return self.sample.output_tokens


class Ledger:
    """Tickets, the queue, calls and leases. Pure bookkeeping: no I/O, no clock, no policy."""

    def __init__(self, engines: int):
        self.tickets: dict[str, Ticket] = {}
        self.queue = UnitQueue()
        # Insertion-ordered (dicts as ordered sets): a set of objects iterates in memory-address order, so cuts
        # and requeues would differ run to run, and the same simulated run would not give the same figures.
        self.calls: dict[Call, None] = {}
        self.engine_samples: list[int] = [0] * engines  # samples in flight per engine
        self.engine_long: list[int] = [0] * engines  # of which known-long (Unit.long): a lane's
        self.samples_inflight = 0
        self.backoff: dict[Unit, None] = {}
        self.outcomes: Counter[str] = Counter()  # "ok", "error", "failed" (pool failure), "abandoned"
        self._seq = 0
        self._calls_started = 0
        self._id_base = f"rp{uuid.uuid4().hex[:12]}"  # unique across pools sharing an engine

    def add_engine(self) -> None:
        self.engine_samples.append(0)
        self.engine_long.append(0)

    # -- a ticket's life -------------------------------------------------------------------------
    def open(self, request: Request, future: asyncio.Future[Result], now: float) -> Ticket:
        ticket = Ticket(request, future, self._next(), now)
        self.tickets[request.id] = ticket
        return ticket

    def unit(self, ticket: Ticket, n: int, part: int | None = None) -> Unit:
        unit = Unit(ticket, n, ticket.seq, part)
        ticket.units.append(unit)
        return unit

    def split(self, unit: Unit, sizes: list[int], prefixes: list[Prefix | None] | None = None) -> list[Unit]:
        """Replace ``unit`` (taken from the queue, or cut short) by pieces of ``sizes`` samples that join into
        its ticket's one result; a piece with a prefix continues that sample (n=1)."""
        ticket = unit.ticket
        if ticket.join is None:
            ticket.join = GroupJoin(ticket.request)
            parts = ticket.join.new_parts(len(sizes))
        else:
            parts = ticket.join.new_parts(len(sizes), replacing=unit.part)
        unit.done = True
        pieces = []
        for part, n, prefix in zip(parts, sizes, prefixes or [None] * len(sizes)):
            piece = self.unit(ticket, n, part)
            piece.attempts, piece.avoid, piece.prefix, piece.long = unit.attempts, unit.avoid, prefix, unit.long
            piece.spread = unit.spread
            pieces.append(piece)
        return pieces

    def enqueue(self, unit: Unit, front: bool = False) -> None:
        unit.queued = True
        unit.requeued = unit.requeued or front
        self.queue.push(unit, front)

    def take(self, key: tuple) -> Unit:
        return self.queue.take(key)

    def start_call(self, engine: int, units: list[Unit], version: int, now: float) -> Call:
        self._calls_started += 1
        call = Call(engine, units, sum(u.n for u in units), version, now, id=f"{self._id_base}-{self._calls_started}")
        for u in units:
            u.call = call
            u.attempts += 1
        self.calls[call] = None
        self.engine_samples[engine] += call.samples
        self.engine_long[engine] += _long(call)
        self.samples_inflight += call.samples
        return call

    def end_call(self, call: Call) -> None:
        """The call's lease ends; its units are requeued, backed off or resolved by the caller next."""
        if call not in self.calls:
            return
        del self.calls[call]
        self.engine_samples[call.engine] -= call.samples
        self.engine_long[call.engine] -= _long(call)
        self.samples_inflight -= call.samples
        for u in call.units:
            u.call = None

    def back_off(self, unit: Unit, timer: asyncio.TimerHandle) -> None:
        """``unit`` waits out a retry back-off; ``timer`` queues it again."""
        unit.timer = timer
        self.backoff[unit] = None

    def end_back_off(self, unit: Unit) -> None:
        unit.timer = None
        self.backoff.pop(unit, None)

    def finish(self, unit: Unit, result: Result) -> list[Call]:
        """A unit's outcome: the whole request's result, or one piece of a split group (the group
        resolves when its last piece is in, or at its first error). Returns orphaned calls, as resolve."""
        ticket = unit.ticket
        if unit.part is None or ticket.join is None:
            return self.resolve(ticket, result)
        if ticket.resolved:
            return []
        unit.done = True
        whole = ticket.join.add(unit.part, result)
        return self.resolve(ticket, whole) if whole is not None else []

    def resolve(self, ticket: Ticket, result: Result | None = None, *, error: BaseException | None = None,
                outcome: str | None = None) -> list[Call]:
        """End ``ticket`` exactly once: its waiter gets ``result`` (or ``error`` raised); every unit left
        behind is dropped. Returns calls that now carry only finished units (the caller cancels them)."""
        if ticket.resolved:
            return []
        ticket.resolved = True
        orphans = []
        for u in ticket.units:
            if u.done:
                continue
            u.done = True
            if u.queued:
                self.queue.discard(u)
            if u.timer is not None:
                u.timer.cancel()
                self.end_back_off(u)
            if u.call is not None and all(x.done for x in u.call.units):
                orphans.append(u.call)
        del self.tickets[ticket.request.id]
        kind = outcome or ("failed" if error is not None else "ok" if result is not None and result.ok else "error")
        self.outcomes[kind] += 1
        if not ticket.future.done():  # the caller may have cancelled its wait
            if error is not None:
                ticket.future.set_exception(error)
            else:
                ticket.future.set_result(result)  # type: ignore[arg-type]
        return orphans

    # -- views -----------------------------------------------------------------------------------
    def tickets_inflight(self) -> int:
        return len({u.ticket.request.id for c in self.calls for u in c.units if not u.done})

    def check(self, caps: list[int] | None = None, global_cap: int | None = None) -> None:
        """Recompute every count from the records; raise AssertionError on any disagreement (tests)."""
        per_engine, long = [0] * len(self.engine_samples), [0] * len(self.engine_samples)
        for c in self.calls:
            per_engine[c.engine] += c.samples
            long[c.engine] += _long(c)
        if per_engine != self.engine_samples or sum(per_engine) != self.samples_inflight:
            raise AssertionError(f"in-flight counts {self.engine_samples} != calls {per_engine}")
        if long != self.engine_long:
            raise AssertionError(f"known-long counts {self.engine_long} != calls {long}")
        live = list(self.queue.units())
        if len(live) != self.queue.size or sum(u.n for u in live) != self.queue.samples:
            raise AssertionError("queue counts disagree with its units")
        for t in self.tickets.values():
            if t.resolved or not any(not u.done for u in t.units):
                raise AssertionError(f"{t.request.id}: open ticket with no live unit")
        if caps is not None and any(s > cap for s, cap in zip(self.engine_samples, caps)):
            raise AssertionError(f"engine in flight {self.engine_samples} above caps {caps}")
        if global_cap is not None and self.samples_inflight > global_cap:
            raise AssertionError(f"{self.samples_inflight} samples in flight above the global cap {global_cap}")

    def _next(self) -> int:
        self._seq += 1
        return self._seq


def _long(call: Call) -> int:
    """Known-long samples a call carries (its units' marks are fixed while it runs)."""
    return sum(u.n for u in call.units if u.long)
