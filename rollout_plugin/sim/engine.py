"""A discrete-event model of one continuous-batching engine (vLLM's scheduler, in aggregate).

State: a FIFO of waiting sequences and a set of running ones. At each step boundary the engine
admits waiting sequences while it has a free sequence slot (``max_num_seqs``), KV room for their
context, and prefill budget (``max_num_batched_tokens``); then every running sequence decodes one
token per step, the first step also prefilling what was just admitted. When KV runs out the most
recently admitted sequence is preempted as vLLM V1 does (recompute): its KV is dropped, it goes back
to the head of the queue, and when it is admitted again its whole context — prompt and every token
generated so far — is prefilled again, taking prefill budget and step time as a new prompt would.
The tokens it generated are kept (vLLM keeps the output, not its KV); only the per-request cost
outside the model (``per_admit_s``: HTTP, tokenizing) is not paid again. Not modelled: prefix-cache
hits on the freed blocks (vLLM may find some still cached), so re-prefill here is an upper bound.

Prefix cache (:mod:`.prefix_cache`, when the engine has one and a request says what its prompt holds): a new
request's leading full blocks found in the cache are not prefilled (nor charged to the prefill budget); its
blocks are held while it runs and join the LRU free queue when it ends, with the full blocks it generated.
Cached blocks live in the KV not held by running sequences and are evicted, least recently freed first, as
running sequences need it. KV accounting itself is unchanged (a block shared by two running sequences is counted
twice), so without shared prefixes — or without a cache — every figure is what it was.

Prefill budget: a step prefills whole sequences up to ``max_num_batched_tokens`` (an over-budget one
alone, as the step's first); the rest join at the next step, as vLLM V1's scheduler gives every step's
budget to its queue. vLLM chunks an over-budget prompt over several steps instead; with step time linear
in prefill tokens the total is the same, only the first token of that sequence comes a step or two early.

Nothing is stepped per token: between events (a completion, KV exhaustion, an arrival, a step whose
budget held the queue back) the batch is constant, so the engine jumps over ``m`` steps at once — step
time grows linearly with the context, so the span of ``m`` steps is a closed-form quadratic in ``m``.
Per-sequence state is kept relative to a global step counter (finish step, admission step), so a jump
is O(1) and a completion is a heap pop.

GRPO groups share their prompt (vLLM's prefix cache): each of a group's ``k`` sequences carries
``prompt / k`` tokens of prompt KV and prefill cost, which sums to the one shared copy.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rollout_plugin.pool.observe.telemetry import EngineMetrics
from rollout_plugin.sim.prefix_cache import Content, PrefixCache, block_ids, output_segment
from rollout_plugin.sim.profile import EngineProfile


class EngineDied(Exception):
    """Raised into the calls of an engine that failed."""


@dataclass(eq=False)
class CachedPrompt:
    """A request's prompt as the prefix cache sees it, shared by its samples (which share its prefill)."""

    request_id: str
    content: Content
    tokens: int
    n: int
    ids: list[int] | None = None  # its full blocks' chain ids (at its first admission)
    cached: int | None = None  # tokens found in the cache at its first sample's admission

    def block_ids(self, block_size: int) -> list[int]:
        if self.ids is None:
            self.ids = block_ids(self.content, block_size)
        return self.ids


@dataclass(eq=False)
class Seq:
    call: SimCall
    prompt: float  # this sequence's share of prompt KV (prompt / k)
    target: int  # tokens to generate in all
    req: CachedPrompt | None = None  # what its prompt holds (None: no prefix caching for it)
    index: int = 0  # which sample of its request
    held: list[int] | None = None  # prefix-cache blocks it holds while running
    done: int = 0  # generated before the current admission (kept across preemptions)
    preempted: int = 0  # times preempted: a re-admission re-prefills prompt + done
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
    aborted: bool = False  # ended by ``pause(mode="abort")``: each seq's ``done`` is what it generated


class SimEngine:
    """One engine on the running event loop's clock. ``slowdown`` > 1 makes a straggler."""

    def __init__(self, name: str, profile: EngineProfile, *, slowdown: float = 1.0,
                 loop: asyncio.AbstractEventLoop | None = None, prefix_cache: PrefixCache | None = None):
        self.name = name
        self.profile = profile
        self.slowdown = slowdown
        self.cache = prefix_cache
        self._loop = loop
        self.alive = True
        self._waiting: deque[Seq] = deque()
        self._heap: list[tuple[int, int, Seq]] = []  # (finish step, tiebreak, seq) of running seqs
        self._admitted: list[Seq] = []  # running seqs in admission order (lazy deletion): preemption victims
        self._tie = itertools.count()
        self._steps = 0  # decode steps done at the last boundary
        self._running = 0
        self._k = 0.0  # Σ (context at admission − admission step) over running seqs: context = k + running·steps
        # The segment under way: from ``_t0`` (a step boundary), ``_m`` steps in pieces of constant
        # batch; piece i starts at step _ps[i], time _pt[i] (relative), first-step time _pu[i],
        # growth per step _pv[i] (context), batch _pb[i]. _done: (step, seq) of sequences that finish
        # inside the segment without finishing their call (popped from the heap, not yet applied).
        self._t0 = 0.0
        self._m = 0
        self._ps: list[int] = []
        self._pt: list[float] = []
        self._pu: list[float] = []
        self._pv: list[float] = []
        self._pb: list[int] = []
        self._done: list[tuple[int, Seq]] = []
        self._done_steps: list[int] = []  # _done's steps, and the running sum of what each takes off _k
        self._done_k: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        self._end = 0.0
        self.paused = False  # /pause: nothing is scheduled until resume()
        self._kv_stale = False  # the weights changed under frozen sequences: their KV must be computed again
        # Counters (the /metrics a vLLM server exports).
        self.generation_tokens = 0.0
        self.prompt_tokens = 0.0
        self.preemptions = 0
        self.recomputed_tokens = 0.0  # prefilled again after a preemption (included in prompt_tokens)
        self.busy_s = 0.0
        self.decode_s = 0.0  # Σ batch × step time over finished segments (vLLM's inter-token latency sum)

    # -- the calls' side ---------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def submit(self, prompt_tokens: list[int], output_tokens: list[list[int]],
               prompts: list[CachedPrompt | None] | None = None) -> SimCall:
        """One call: per request its prompt length and its samples' output lengths (and, for the prefix
        cache, what its prompt holds)."""
        call = SimCall(self.loop.create_future())
        if not self.alive:
            call.future.set_exception(EngineDied(f"{self.name} is dead"))
            return call
        if prompts is None or self.cache is None:
            prompts = [None] * len(prompt_tokens)
        for prompt, outs, req in zip(prompt_tokens, output_tokens, prompts):
            share = prompt / max(1, len(outs))
            for j, target in enumerate(outs):
                call.seqs.append(Seq(call, share, max(1, target), req, j))
        call.left = len(call.seqs)
        self._waiting.extend(call.seqs)
        self._arrived()
        return call

    def abort(self, call: SimCall, *, answer: bool = False) -> None:
        """The client went away (a cancelled call): free its sequences, as vLLM aborts a request. ``answer``:
        aborted engine-side (``/abort_requests``) while the client waits, which then gets each sequence's tokens
        so far (``call.aborted``), as vLLM's output processor answers an aborted request
        (``vllm/v1/engine/output_processor.py`` ``abort_requests``: a final output, finish reason ``abort``)."""
        if not self.alive or (answer and call.future.done()):  # (a cancelled client's future is done too)
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
                s.done += self._steps - s.admit_step  # what it generated: a stream had delivered it
                self._release(s, s.done)
        if answer:
            call.aborted = True
            call.future.set_result(None)
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
        calls = {id(s.call): s.call for s in itertools.chain(self._waiting, (e[2] for e in self._heap),
                                                             (d[1] for d in self._done))}
        self._done.clear()
        self._done_steps, self._done_k = [], []
        self._waiting.clear()
        self._heap.clear()
        self._admitted.clear()
        self._running, self._k = 0, 0.0
        if self.cache is not None:
            self.cache.reset()  # its KV died with it
        for c in calls.values():
            if not c.future.done():
                c.future.set_exception(EngineDied(f"{self.name} died"))

    def generated(self, s: Seq) -> int:
        """Tokens ``s`` has generated so far (at the last step boundary the engine synced to)."""
        if s.finished:
            return s.target
        return s.done + (self._steps - s.admit_step if s.running else 0)

    def pause(self, mode: str) -> None:
        """vLLM's ``/pause?mode=…`` (``vllm/v1/engine/async_llm.py`` ``pause_generation``): nothing new is
        scheduled until :meth:`resume`; ``abort`` ends every unfinished request at once, answered with the
        tokens it has (finish reason ``abort``); ``keep`` freezes them where they are, KV cache and all."""
        if not self.alive:
            return
        if mode not in ("abort", "keep"):
            raise ValueError(f"pause mode {mode!r}: the simulator models abort and keep")
        self._sync_partial()
        self.paused = True
        if mode == "abort":
            self._abort_all()

    def resume(self) -> None:
        """vLLM's ``/resume``. Sequences frozen across a weight load re-prefill their context (prompt share +
        tokens so far): their KV was computed with the old weights (AReaL recomputes it so; vLLM's ``keep``
        would go on from the stale KV — the re-prefill is the cost of doing it right)."""
        if not self.alive or not self.paused:
            return
        self.paused = False
        if self._kv_stale:
            self._kv_stale = False
            self._requeue_running()
        self._replan_now()

    def invalidate_cache(self) -> None:
        """``/reset_prefix_cache`` after a weight load: cached KV belongs to the old weights. The prefix cache
        empties; running sequences drop their blocks (they are prefilled again, now or at ``resume``)."""
        if self.cache is not None:
            self.cache.reset()
            for s in self._admitted:
                s.held = None
        if self._running:
            self._kv_stale = True
            if not self.paused:
                self._sync_partial()
                self._kv_stale = False
                self._requeue_running()
                self._replan_now()

    def _requeue_running(self) -> None:
        """Every running sequence back to the head of the queue (admission order kept), to be prefilled again;
        its tokens are kept. Not a preemption: the scheduler was not short of KV."""
        running = [s for s in self._admitted if s.running]
        for s in running:
            s.done += self._steps - s.admit_step
            s.running = False
            s.preempted += 1
            self._release(s, s.done)  # its re-admission re-prefills prompt + done (counted in recomputed_tokens)
        self._waiting.extendleft(reversed(running))
        self._heap.clear()
        self._admitted.clear()
        self._running, self._k = 0, 0.0

    def _abort_all(self) -> None:
        calls: dict[int, SimCall] = {}
        for s in itertools.chain((s for s in self._admitted if s.running), self._waiting):
            if s.running:
                s.done += self._steps - s.admit_step
                s.running = False
                self._release(s, s.done)
            calls[id(s.call)] = s.call
        self._heap.clear()
        self._admitted.clear()
        self._waiting.clear()
        self._running, self._k = 0, 0.0
        for c in calls.values():
            for s in c.seqs:
                if not s.finished:
                    s.aborted = True
            if not c.future.done():
                c.aborted = True
                c.future.set_result(None)

    def metrics(self) -> EngineMetrics:
        j = self._steps_by(self.loop.time() - self._t0) if self._timer is not None else 0
        gone = bisect.bisect_right(self._done_steps, j)  # finished since the segment began
        running = self._running - gone
        k = self._k - (self._done_k[gone - 1] if gone else 0.0)
        kv = k + running * (self._steps + j) + running * self.profile.block_size / 2  # half a block of rounding
        generated = self.generation_tokens + self._tokens(j)
        return EngineMetrics(running=running, waiting=len(self._waiting),
                             kv_usage=min(1.0, kv / self.profile.kv_tokens),
                             preemptions_total=float(self.preemptions),
                             generation_tokens_total=generated,
                             prompt_tokens_total=self.prompt_tokens, kv_tokens=self.profile.kv_tokens,
                             step_tokens_sum=generated, steps_total=float(self._steps + j),
                             itl_sum=self.decode_s + self._decode_s(j), itl_count=generated)

    # -- the model ---------------------------------------------------------------------------------
    def _piece(self, step: int) -> int:
        return bisect.bisect_right(self._ps, step) - 1

    def _span(self, m: int) -> float:
        """Seconds from the segment's start to the end of its ``m``-th step."""
        i = self._piece(m - 1) if m > 0 else 0
        n = m - self._ps[i]
        return self._pt[i] + n * self._pu[i] + self._pv[i] * n * (n - 1) / 2

    def _steps_by(self, dt: float) -> int:
        """Whole steps of the current segment finished ``dt`` seconds after its start."""
        i = max(0, bisect.bisect_right(self._pt, dt) - 1)
        x = dt - self._pt[i]
        if x <= 0:
            return self._ps[i]
        u, v = self._pu[i], self._pv[i]
        if v <= 0:
            j = x / u
        else:
            b = u - v / 2
            j = (-b + math.sqrt(b * b + 2 * v * x)) / v
        return max(0, min(self._m, self._ps[i] + int(j + 1e-9)))

    def _tokens(self, j: int) -> int:
        """Tokens generated by the first ``j`` steps of the segment."""
        total, ps, pb = 0, self._ps, self._pb
        for i in range(len(ps)):
            if ps[i] >= j:
                break
            hi = ps[i + 1] if i + 1 < len(ps) else self._m
            total += (min(hi, j) - ps[i]) * pb[i]
        return total

    def _decode_s(self, j: int) -> float:
        """Σ batch × step time over the first ``j`` steps of the segment: each sequence waits a whole step for its
        token, so this is what vLLM's ``inter_token_latency_seconds`` sums."""
        total, ps = 0.0, self._ps
        for i in range(len(ps)):
            if ps[i] >= j:
                break
            hi = min(ps[i + 1] if i + 1 < len(ps) else self._m, j)
            total += self._pb[i] * (self._span(hi) - self._pt[i])
        return total

    def _sync_partial(self) -> None:
        """Bring the counters to the last finished step, cutting the segment there."""
        if self._timer is None:
            return
        j = self._steps_by(self.loop.time() - self._t0)
        self._timer.cancel()
        self._timer = None
        # Even with no whole step done (j = 0) the segment ends here: its pieces and completions must go, or the
        # next segment is planned on top of them (an abort in a segment's first step once made the engine's
        # remaining sequences decode hundreds of times too slowly: tests/test_tail_spread.py).
        self._advance(j, self._t0 + self._span(j) if j else self._t0)

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
        if self._ps:
            self.generation_tokens += self._tokens(m)
            self.decode_s += self._decode_s(m)
        self._steps += m
        self._t0 = t
        self._m = 0
        self._ps, self._pt, self._pu, self._pv, self._pb = [], [], [], [], []
        done, self._done = self._done, []
        self._done_steps, self._done_k = [], []
        for d, s in done:
            if d > m:  # the segment was cut before it: still running
                heapq.heappush(self._heap, (s.admit_step + s.target - s.done, next(self._tie), s))
            elif s.running:
                self._finish(s)
        heap = self._heap
        while heap and heap[0][0] <= self._steps:
            finish, _, s = heapq.heappop(heap)
            if s.running and finish == s.admit_step + s.target - s.done:
                self._finish(s)  # (else: aborted, or preempted: a re-admitted sequence has a newer entry)

    def _finish(self, s: Seq) -> None:
        s.running, s.finished = False, True
        self._release(s, s.target)
        self._running -= 1
        self._k -= s.context_at_admit - s.admit_step
        call = s.call
        call.left -= 1
        if call.left == 0 and not call.future.done():
            call.future.set_result(None)

    # -- the prefix cache --------------------------------------------------------------------------
    def _cached_share(self, s: Seq, *, count: bool) -> float:
        """Prompt tokens of ``s``'s share found in the cache. A request is looked up once, at its first
        sample's admission (its samples share one prefill); a preempted sequence re-prefills in full."""
        req, cache = s.req, self.cache
        if s.preempted or req is None or cache is None:
            return 0.0
        if req.cached is None:
            ids = req.block_ids(cache.block_size)
            if not count:
                return cache.peek(ids, req.tokens) / req.n
            req.cached = cache.lookup(ids, req.tokens)
        return req.cached / req.n

    def _hold(self, s: Seq, kv_room: float) -> None:
        """``s`` holds its prompt's blocks; the free ones beyond the KV left over are evicted."""
        cache = self.cache
        ids = s.req.block_ids(cache.block_size)
        cache.acquire(ids)
        s.held = ids
        cache.trim(int(kv_room // cache.block_size))

    def _release(self, s: Seq, generated: int) -> None:
        """``s`` lets go of its blocks: its prompt's, and the full blocks of what it generated (cached too), all
        but the last token, which was sampled and never computed (vLLM caches ``num_computed_tokens``)."""
        if s.held is None or self.cache is None:
            return
        held, s.held = s.held, None
        req, bs = s.req, self.cache.block_size
        out = block_ids(req.content + ((output_segment(req.request_id, s.index), generated - 1),), bs,
                        skip=len(req.content)) if generated > 1 else []
        self.cache.release(held, out)

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
        if self.paused:
            self._timer = None
            return
        p = self.profile
        cap = p.kv_tokens
        half_block = p.block_size / 2
        steps = self._steps

        def kv_used() -> float:
            return self._k + self._running * (steps + half_block)

        if self.cache is not None:  # the running sequences grew since the last boundary
            self.cache.trim(int((cap - kv_used()) // p.block_size))
        while self._running and kv_used() + self._running > cap:
            self._preempt_last()
        # Admit: FIFO, while a slot, KV room and prefill budget remain.
        prefill, admitted = 0.0, 0
        budget = p.max_num_batched_tokens - self._running
        budget_bound = False  # the head waits only for this step's token budget: it goes in at the next step
        waiting = self._waiting
        while waiting and self._running < p.max_num_seqs:
            s = waiting[0]
            if s.aborted:
                waiting.popleft()
                continue
            ctx = s.context_at_admit
            if self._running and kv_used() + ctx + half_block + 1 > cap:
                break  # (an idle engine takes its head even if oversized: it would never fit otherwise)
            new = ctx - self._cached_share(s, count=False) if s.req is not None else ctx
            if prefill and new > budget:
                budget_bound = True
                break
            waiting.popleft()
            s.running, s.admit_step = True, steps
            self._running += 1
            self._k += ctx - steps
            self._admitted.append(s)
            heapq.heappush(self._heap, (steps + s.target - s.done, next(self._tie), s))
            if s.req is not None:  # counted once admitted (a head the budget held back is looked up again)
                new = ctx - self._cached_share(s, count=True)
                self._hold(s, cap - kv_used())
            prefill += new
            if s.preempted:
                self.recomputed_tokens += ctx
            else:
                admitted += 1  # (a re-admission is the scheduler's own work: no HTTP, no tokenizing)
            budget -= new + 1
        if len(self._admitted) > 2 * self._running + 64:
            self._admitted = [s for s in self._admitted if s.running]
        self.prompt_tokens += prefill
        if not self._running:
            self._timer = None
            return
        self._plan_segment(cap - kv_used(), prefill, admitted, next_step=budget_bound)

    def _preempt_last(self) -> None:
        """KV is short: the most recently admitted sequence goes back to the head of the queue (recompute)."""
        victim = self._admitted.pop()
        if not victim.running:
            return
        self._running -= 1
        self._k -= victim.context_at_admit - victim.admit_step
        victim.done += self._steps - victim.admit_step  # kept: recompute re-prefills them, it doesn't redo them
        victim.running = False
        victim.preempted += 1
        self._release(victim, victim.done)
        self.preemptions += 1
        self._waiting.appendleft(victim)

    def _plan_segment(self, kv_room: float, prefill: float, admitted: int, *, next_step: bool = False) -> None:
        """Walk completions in finish order until one matters outside the engine (its call is done,
        or a freed slot could admit a waiting sequence) or KV runs out; the batch shrinks at each.
        ``next_step``: the queue's head waits only for the next step's prefill budget, so the segment is one
        step (``vllm/v1/core/sched/scheduler.py`` ``schedule``: every step, running requests first, then
        waiting ones while ``token_budget`` lasts). One-step segments last only while a prefill backlog
        drains, at least one sequence admitted each."""
        step, slow = self.profile.step, self.slowdown
        steps0, running, k = self._steps, self._running, self._k
        limit = 1 if next_step else max(1, int(kv_room // running))
        admit_on_free = bool(self._waiting)
        heap, done, done_steps, done_k = self._heap, self._done, self._done_steps, self._done_k
        left: dict[int, int] = {}
        ps, pt, pu, pv, pb = self._ps, self._pt, self._pu, self._pv, self._pb
        start, t = 0, slow * (step.per_prefill_token_s * prefill + step.per_admit_s * admitted)

        def piece(upto: int) -> None:
            nonlocal start, t
            n = upto - start
            if n <= 0:
                return
            u = slow * step.seconds(running, k + running * (steps0 + start), 0.0)
            v = slow * step.per_ctx_token_s * running
            ps.append(start), pt.append(t), pu.append(u), pv.append(v), pb.append(running)
            t += n * u + v * n * (n - 1) / 2
            start = upto

        while heap:
            finish, _, s = heap[0]
            d = finish - steps0
            if d >= limit:
                break
            heapq.heappop(heap)
            if not s.running or finish != s.admit_step + s.target - s.done:
                continue
            piece(d)
            done.append((d, s))
            done_steps.append(d)
            done_k.append((done_k[-1] if done_k else 0.0) + s.context_at_admit - s.admit_step)
            c = id(s.call)
            left[c] = left.get(c, s.call.left) - 1
            if admit_on_free or left[c] == 0 or running == 1:
                limit = d
                break
            running -= 1
            k -= s.context_at_admit - s.admit_step
        piece(limit)
        self._m = limit
        self._end = self._t0 + t
        self._timer = self.loop.call_at(self._end, self._on_boundary)


EngineFactory = Callable[[int], SimEngine]
