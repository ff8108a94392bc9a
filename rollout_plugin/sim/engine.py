"""A discrete-event model of one continuous-batching engine (vLLM's scheduler, in aggregate).

State: a FIFO of waiting sequences and a set of running ones. At each step boundary the engine
admits waiting sequences while it has a free sequence slot (``max_num_seqs``), KV room for their
context, and prefill budget (``max_num_batched_tokens``); then every running sequence decodes one
token per step, the first step also prefilling what was just admitted. When KV runs out the most
recently admitted sequence is preempted (recompute: its KV is dropped and it re-prefills later),
as vLLM does.

Nothing is stepped per token: between events (a completion, KV exhaustion, an arrival) the batch
is constant, so the engine jumps over ``m`` steps at once — step time grows linearly with the
context, so the span of ``m`` steps is a closed-form quadratic in ``m``. Per-sequence state is
kept relative to a global step counter (finish step, admission step), so a jump is O(1) and a
completion is a heap pop.

GRPO groups share their prompt (vLLM's prefix cache): each of a group's ``k`` sequences carries
``prompt / k`` tokens of prompt KV and prefill cost, which sums to the one shared copy.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rollout_plugin.pool.telemetry import EngineMetrics
from rollout_plugin.sim.profile import EngineProfile


class EngineDied(Exception):
    """Raised into the calls of an engine that failed."""


@dataclass(eq=False)
class Seq:
    call: SimCall
    prompt: float  # this sequence's share of prompt KV (prompt / k)
    target: int  # tokens to generate in all
    done: int = 0  # generated before the current admission (kept across preemptions)
    admit_step: int = -1
    running: bool = False
    finished: bool = False
    aborted: bool = False

    @property
    def context_at_admit(self) -> float:
        return self.prompt + self.done


@dataclass(eq=False)
class SimCall:
    """One engine call: its sequences, a future resolved when the last one finishes."""

    future: asyncio.Future
    seqs: list[Seq] = field(default_factory=list)
    left: int = 0


class SimEngine:
    """One engine on the running event loop's clock. ``slowdown`` > 1 makes a straggler."""

    def __init__(self, name: str, profile: EngineProfile, *, slowdown: float = 1.0,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.name = name
        self.profile = profile
        self.slowdown = slowdown
        self._loop = loop
        self.alive = True
        self._waiting: deque[Seq] = deque()
        self._heap: list[tuple[int, int, Seq]] = []  # (finish step, tiebreak, seq) of running seqs
        self._admitted: list[Seq] = []  # running seqs in admission order (lazy deletion): preemption victims
        self._tie = itertools.count()
        self._steps = 0  # decode steps done at the last boundary
        self._running = 0
        self._k = 0.0  # Σ (context at admission − admission step) over running seqs: context = k + running·steps
        # The segment under way: from ``_t0`` (a step boundary), ``_m`` steps with a fixed batch.
        self._t0 = 0.0
        self._m = 0
        self._u = 0.0  # first-step time without prefill
        self._v = 0.0  # step-time growth per step
        self._pre = 0.0  # prefill time of the first step
        self._timer: asyncio.TimerHandle | None = None
        self._end = 0.0
        # Counters (the /metrics a vLLM server exports).
        self.generation_tokens = 0.0
        self.prompt_tokens = 0.0
        self.preemptions = 0
        self.busy_s = 0.0
        self._gen_now = 0.0

    # -- the calls' side ---------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def submit(self, prompt_tokens: list[int], output_tokens: list[list[int]]) -> SimCall:
        """One call: per request its prompt length and its samples' output lengths."""
        call = SimCall(self.loop.create_future())
        if not self.alive:
            call.future.set_exception(EngineDied(f"{self.name} is dead"))
            return call
        for prompt, outs in zip(prompt_tokens, output_tokens):
            share = prompt / max(1, len(outs))
            for target in outs:
                call.seqs.append(Seq(call, share, max(1, target)))
        call.left = len(call.seqs)
        self._waiting.extend(call.seqs)
        self._arrived()
        return call

    def abort(self, call: SimCall) -> None:
        """The client went away (a cancelled call): free its sequences, as vLLM aborts a request."""
        if not self.alive:
            return
        if any(s.running for s in call.seqs):
            self._sync_partial()
        freed = False
        for s in call.seqs:
            if s.finished or s.aborted:
                continue
            s.aborted = True
            if s.running:
                s.running, freed = False, True
                self._running -= 1
                self._k -= s.context_at_admit - s.admit_step
        if freed or self._timer is None:
            self._replan_now()

    def fail(self) -> None:
        """The engine dies: every call in it errors, later calls error at once."""
        if not self.alive:
            return
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        calls = {id(s.call): s.call for s in itertools.chain(self._waiting, (e[2] for e in self._heap))}
        self._waiting.clear()
        self._heap.clear()
        self._admitted.clear()
        self._running, self._k = 0, 0.0
        for c in calls.values():
            if not c.future.done():
                c.future.set_exception(EngineDied(f"{self.name} died"))

    def metrics(self) -> EngineMetrics:
        self._sync_counters()
        ctx = self._k + self._running * self._steps
        kv = ctx + self._running * self.profile.block_size / 2  # half a block of rounding per sequence
        return EngineMetrics(running=self._running, waiting=sum(1 for s in self._waiting if not s.aborted),
                             kv_usage=min(1.0, kv / self.profile.kv_tokens),
                             preemptions_total=float(self.preemptions),
                             generation_tokens_total=self._gen_now, prompt_tokens_total=self.prompt_tokens,
                             kv_tokens=self.profile.kv_tokens)

    # -- the model ---------------------------------------------------------------------------------
    def _span(self, m: float) -> float:
        """Seconds for the first ``m`` steps of the current segment."""
        return self._pre + m * self._u + self._v * m * (m - 1) / 2

    def _steps_by(self, dt: float) -> int:
        """Whole steps of the current segment finished ``dt`` seconds after its start."""
        if dt <= self._pre:
            return 0
        x = dt - self._pre
        if self._v <= 0:
            j = x / self._u
        else:
            b = self._u - self._v / 2
            j = (-b + math.sqrt(b * b + 2 * self._v * x)) / self._v
        return max(0, min(self._m, int(j + 1e-9)))

    def _sync_counters(self) -> None:
        j = self._steps_by(self.loop.time() - self._t0) if self._timer is not None else 0
        self._gen_now = self.generation_tokens + j * self._running

    def _sync_partial(self) -> None:
        """Bring the counters to the last finished step, cutting the segment there."""
        if self._timer is None:
            return
        j = self._steps_by(self.loop.time() - self._t0)
        self._timer.cancel()
        self._timer = None
        if j:
            self._advance(j, self._t0 + self._span(j))

    def _arrived(self) -> None:
        if self._timer is None:
            self._replan_now()
            return
        # Join at the next step boundary: cut the segment there (if it ends later).
        j = self._steps_by(self.loop.time() - self._t0) + 1
        if j < self._m:
            when = self._t0 + self._span(j)
            self._timer.cancel()
            self._m = j
            self._end = when
            self._timer = self.loop.call_at(when, self._on_boundary)

    def _advance(self, m: int, t: float) -> None:
        self.busy_s += t - self._t0
        self._steps += m
        self.generation_tokens += m * self._running
        self._t0 = t
        self._m = 0
        heap = self._heap
        while heap and heap[0][0] <= self._steps:
            finish, _, s = heapq.heappop(heap)
            if not s.running or finish != s.admit_step + s.target - s.done:
                continue  # aborted, or preempted (a re-admitted sequence has a newer entry)
            s.running, s.finished = False, True
            self._running -= 1
            self._k -= s.context_at_admit - s.admit_step
            call = s.call
            call.left -= 1
            if call.left == 0 and not call.future.done():
                call.future.set_result(None)

    def _on_boundary(self) -> None:
        self._timer = None
        self._advance(self._m, self._end)
        self._replan_now()

    def _replan_now(self) -> None:
        now = self.loop.time()
        if self._running == 0:
            self._t0 = now  # idle time is not busy time
        elif now > self._t0:
            self._t0 = now
        self._plan()

    def _plan(self) -> None:
        """At a step boundary: preempt if KV is short, admit what fits, schedule the next event."""
        p = self.profile
        cap = p.kv_tokens
        half_block = p.block_size / 2
        steps = self._steps

        def kv_used() -> float:
            return self._k + self._running * (steps + half_block)

        # Preempt (most recent first) until every running sequence can take its next token.
        while self._running and kv_used() + self._running > cap:
            victim = self._admitted.pop()
            if not victim.running:
                continue
            self._running -= 1
            self._k -= victim.context_at_admit - victim.admit_step
            victim.done += steps - victim.admit_step  # kept: recompute re-prefills them, it doesn't redo them
            victim.running = False
            self.preemptions += 1
            self._waiting.appendleft(victim)
        # Admit: FIFO, while a slot, KV room and prefill budget remain.
        prefill = 0.0
        budget = p.max_num_batched_tokens - self._running
        waiting = self._waiting
        while waiting and self._running < p.max_num_seqs:
            s = waiting[0]
            if s.aborted:
                waiting.popleft()
                continue
            ctx = s.context_at_admit
            if self._running and (kv_used() + ctx + half_block + 1 > cap or (prefill and ctx > budget)):
                break  # (an idle engine takes its head even if oversized: it would never fit otherwise)
            waiting.popleft()
            s.running, s.admit_step = True, steps
            self._running += 1
            self._k += ctx - steps
            self._admitted.append(s)
            heapq.heappush(self._heap, (steps + s.target - s.done, next(self._tie), s))
            prefill += ctx
            budget -= ctx + 1
        if len(self._admitted) > 2 * self._running + 64:
            self._admitted = [s for s in self._admitted if s.running]
        self.prompt_tokens += prefill
        if not self._running:
            self._timer = None
            return
        # Next event: the first completion, or the step where KV runs out.
        m = self._heap[0][0] - steps
        room = cap - kv_used()
        m = max(1, min(m, int(room // self._running)))
        ctx = self._k + self._running * steps
        slow = self.slowdown
        self._u = slow * p.step.seconds(self._running, ctx, 0.0)
        self._v = slow * p.step.per_ctx_token_s * self._running
        self._pre = slow * p.step.per_prefill_token_s * prefill
        self._m = m
        self._end = self._t0 + self._span(m)
        self._timer = self.loop.call_at(self._end, self._on_boundary)


EngineFactory = Callable[[int], SimEngine]
