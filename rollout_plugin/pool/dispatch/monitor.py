"""The pool's observe-decide-apply loop: scrape each engine, step its controller, apply the cap.

I/O lives here (scraping through the engine clients, the timeline file); the decisions are
:func:`rollout_plugin.pool.policy.caps.step`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from rollout_plugin.pool.transport.http import EngineClient
from rollout_plugin.pool.policy.caps import (
    ControllerConfig,
    ControllerMode,
    ControlState,
    Decision,
    Observation,
    Progress,
    fresh,
    initial_state,
    kv_estimate_cap,
    step,
    watch_progress,
)
from rollout_plugin.pool.dispatch.dispatcher import Dispatcher
from rollout_plugin.pool.transport.health import looks_healthy
from rollout_plugin.pool.policy.cadence import Needs, busy, next_wait, tail_opened, urgent
from rollout_plugin.pool.policy.packing import PackObservation, initial_pack_state, pack_step
from rollout_plugin.pool.policy.spread import MIN_CROWD, StepFit, TailShare, batch_bound, fit_step, plan_spread
from rollout_plugin.pool.policy.straggler import EngineRate, EngineShare, judge_speeds, plan_moves
from rollout_plugin.pool.observe.telemetry import EngineMetrics, parse_vllm_metrics, step_point
from rollout_plugin.pool.observe.timeline import TimelineRecorder

log = logging.getLogger(__name__)


def prompt_tokens_estimate(prompt: object) -> int:
    """A prompt's length in tokens before the engine says: token ids are exact; text about 4 characters a token
    (English BPE vocabularies); chat messages their contents' plus a few template tokens each."""
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list | tuple):
        return sum(len(str(m.get("content", ""))) // 4 + 8 if isinstance(m, dict) else 8 for m in prompt)
    return 0


class Monitor:
    def __init__(self, dispatcher: Dispatcher, clients: Sequence[EngineClient], cfg: ControllerConfig, *,
                 group_size: int, expected_tokens: int, ratio: float, clock: Callable[[], float],
                 timeline: TimelineRecorder | None = None, stall_s: float = 60.0, max_num_seqs: int | None = None):
        self.dispatcher = dispatcher
        self.cfg = cfg
        self.group_size = group_size
        self.expected_tokens = expected_tokens
        self.ratio = ratio
        self.clock = clock
        self.timeline = timeline
        self.states: list[ControlState] | None = None
        self.latest: list[EngineMetrics] = [EngineMetrics() for _ in clients]
        self.cap_changes = 0
        self.observed = 0  # rounds in which some engine's /metrics answered
        self.stall_s = stall_s
        self.pack = initial_pack_state(dispatcher.pack_size)
        self.pack_changes = 0
        self.progress: list[Progress | None] = [None for _ in clients]
        # A first cap may go above the context-length preset up to what the engine batches (× ratio), when
        # its KV cache holds more: unknown batch limit, no higher than the preset.
        self.upper = math.ceil(max_num_seqs * ratio) if max_num_seqs else None
        self.speeds: list[float] = [1.0 for _ in clients]
        # Without the user's expected_tokens the first caps assume every sequence fills max_model_len (the
        # worst case); the first request's own need (prompt + max_tokens) replaces it once it is seen.
        self.sized = cfg.expected_tokens is not None or cfg.mode == ControllerMode.off
        self.moved = 0  # samples cut off slow engines at a step's end
        self.spread = 0  # samples of calls moved from crowded engines to idle ones at a step's end
        self.fit = StepFit()  # the fleet's decode step time against batch size (spread.fit_step)
        # Engines idle at the last look and every poll since: one idle now and not in it opens the tail.
        self.idle_seen: frozenset[int] = frozenset()
        self.wait_s = cfg.interval_s  # until the next look (pool/policy/cadence.py)

    @property
    def clients(self) -> list[EngineClient]:
        return self.dispatcher.clients  # a restarted engine gets a new client

    def reset_engine(self, index: int) -> None:
        """A restarted engine starts its controller afresh."""
        if self.states is not None:
            _, cap, _, _ = self.dispatcher.engine_state(index)
            self.states[index] = initial_state(cap, self.cfg, self.group_size)
        self.latest[index] = EngineMetrics()
        self.progress[index] = None
        if index < len(self.speeds):
            self.speeds[index] = 1.0  # judged afresh
            self.dispatcher.set_speed(index, 1.0)

    async def _timed(self, client: EngineClient) -> tuple[str | None, float, float]:
        """One /metrics answer, when it came and how long it took: a late answer is no measurement
        (control.fresh), and each engine's numbers are stamped with their own answer's time."""
        t0 = self.clock()
        text = await client.metrics()
        t1 = self.clock()
        return text, t1, t1 - t0

    async def _scrape(self) -> tuple[list[EngineMetrics], list[tuple[float, float]]]:
        got = await asyncio.gather(*(self._timed(c) for c in self.clients), return_exceptions=True)
        now = self.clock()
        got = [(None, now, 0.0) if isinstance(g, BaseException) else g for g in got]
        return [parse_vllm_metrics(t) if t else EngineMetrics() for t, _, _ in got], [(at, lag) for _, at, lag in got]

    def _start(self, metrics: list[EngineMetrics]) -> list[ControlState]:
        states = []
        for i, m in enumerate(metrics):
            _, preset, _, _ = self.dispatcher.engine_state(i)
            cap, why = preset, "preset by context length"
            if self.cfg.mode == ControllerMode.adaptive:
                cap, why = kv_estimate_cap(preset, m.kv_tokens, self.expected_tokens, self.ratio, self.upper)
            state = initial_state(cap, self.cfg, self.group_size, preset=preset)
            if state.cap != preset:
                self.dispatcher.set_cap(i, state.cap, why)
                self.cap_changes += 1
            states.append(state)
        return states

    def _size_from_requests(self, metrics: list[EngineMetrics]) -> None:
        """Once the first request is seen: first caps from what it will need (its prompt + max_tokens, at most
        max_model_len), raised where the worst case had held them lower; never lowered (work is out already)."""
        ticket = next(iter(self.dispatcher.ledger.tickets.values()), None)
        if ticket is None or self.states is None:
            return
        self.sized = True
        r = ticket.request
        need = min(self.expected_tokens, prompt_tokens_estimate(r.prompt) + r.sampling.max_tokens)
        if need >= self.expected_tokens:
            return
        log.info("monitor: first caps for sequences of %d tokens (the first request's prompt + max_tokens), "
                 "not max_model_len's %d", need, self.expected_tokens)
        self.expected_tokens = need
        for i, (m, state) in enumerate(zip(metrics, self.states)):
            _, cap, _, healthy = self.dispatcher.engine_state(i)
            if not healthy or not state.slow_start:  # (the controller has moved it already: its call)
                continue
            preset = max(cap, state.ceiling // 2)  # the context-length preset (the ceiling is twice it)
            est, why = kv_estimate_cap(preset, m.kv_tokens, need, self.ratio, self.upper)
            if est > state.cap:
                self.states[i] = replace(state, cap=est, ceiling=max(state.ceiling, est))
                self.dispatcher.set_cap(i, est, why)
                self.cap_changes += 1

    def observe(self, metrics: list[EngineMetrics], now: float | None = None,
                timing: Sequence[tuple[float, float]] | None = None) -> None:
        """One control step for every engine (public so tests can drive it without the loop); ``timing``: per
        engine, when its answer came and how long it took (a late one is no measurement); unset: ``now``, 0."""
        now = self.clock() if now is None else now
        timing = list(timing) if timing is not None else []
        previous, self.latest = self.latest, metrics
        self.observed += any(m.generation_tokens_total is not None for m in metrics)
        if self.states is None:
            self.states = self._start(metrics)
        if not self.sized:
            self._size_from_requests(metrics)
        for i in range(len(self.states), len(metrics)):  # engines that joined since (Dispatcher.add_client)
            self.states.append(initial_state(self.dispatcher.engine_state(i)[1], self.cfg, self.group_size))
        self.progress.extend([None] * (len(metrics) - len(self.progress)))
        backlog = self.dispatcher.backlog_samples
        need = self.dispatcher.largest_pending_n  # no cap may stay below it, or that request waits for ever
        pool_tokens = 0.0
        rates = [EngineRate(i, None, None) for i in range(len(metrics))]  # filled where measured
        needs: list[Needs] = []
        if self.dispatcher.metrics is not None:
            self.dispatcher.metrics.queued.set(backlog)
        for i, (client, m) in enumerate(zip(self.clients, metrics)):
            inflight, cap, client_tokens, healthy = self.dispatcher.engine_state(i)
            if not healthy:
                rates[i] = EngineRate(i, None, None, healthy=False)
                if self.dispatcher.metrics is not None:
                    self.dispatcher.metrics.healthy.labels(client.name).set(0)
                continue
            counted = (None if m.generation_tokens_total is None
                       else m.generation_tokens_total + (m.prompt_tokens_total or 0.0))
            self.progress[i], stalled = watch_progress(self.progress[i], counted, inflight, now, self.stall_s)
            if stalled:
                self.dispatcher.mark_dead(i, f"hung: no token counted for {self.stall_s:g} s "
                                             f"with {inflight} samples in flight")
                self.progress[i] = None
                continue
            tokens = m.generation_tokens_total if m.generation_tokens_total is not None else float(client_tokens)
            pool_tokens += tokens
            at, lag = timing[i] if i < len(timing) else (now, 0.0)
            obs = Observation(t=at, inflight=inflight, backlog=backlog, tokens_total=tokens, running=m.running,
                              waiting=m.waiting, kv_usage=m.kv_usage, preemptions_total=m.preemptions_total,
                              need=need, lag=lag)
            measured = fresh(self.states[i], obs, self.cfg) and self.states[i].last_t is not None
            before = self.states[i]
            self.states[i], decision = step(self.states[i], obs, self.cfg)
            needs.append(self._engine_needs(before, self.states[i], decision, m, inflight))
            rates[i] = EngineRate(i, self.states[i].throughput if measured else None, m.running, kv_usage=m.kv_usage)
            point = step_point(previous[i], m) if i < len(previous) else None
            if point is not None:
                self.fit = fit_step(self.fit, *point)
            if decision.changed:
                self.dispatcher.set_cap(i, decision.cap, decision.reason or "")
                self.cap_changes += 1
            self._export(i, client.name, m, inflight, backlog, now)
        pack_changes, moved = self.pack_changes, self.moved + self.spread
        self.idle_seen, _ = self._idle_engines()
        self._tune_pack(now, backlog, pool_tokens)
        self._judge_stragglers(rates, backlog)
        self._spread_tail(rates, backlog)
        if self.timeline is not None:
            self.timeline.flush()
        self._set_wait(needs, backlog, changed=self.pack_changes != pack_changes
                      or self.moved + self.spread != moved)

    def _engine_needs(self, before: ControlState, after: ControlState, decision: Decision, m: EngineMetrics,
                      inflight: int) -> Needs:
        """What engine ``i``'s look found that wants the next look soon (pool/policy/cadence.py)."""
        preempted = (m.preemptions_total is not None and before.last_preemptions is not None
                     and m.preemptions_total > before.last_preemptions)
        return Needs(
            at_cap=inflight >= self.cfg.at_cap_fraction * after.cap,
            pressure=preempted or (m.kv_usage is not None and m.kv_usage >= self.cfg.kv_high),
            deciding=decision.changed or decision.reason is not None or after.trial is not None,
            unseen=m.generation_tokens_total is None)

    def _set_wait(self, needs: list[Needs], backlog: int, changed: bool) -> None:
        """The period until the next look: short while anything needs deciding, longer while nothing does."""
        found = Needs(backlog=backlog, at_cap=any(n.at_cap for n in needs),
                      pressure=any(n.pressure for n in needs),
                      deciding=changed or not self.sized or any(n.deciding for n in needs),
                      slow=any(v < self.cfg.slow_below for v in self.speeds),
                      unseen=any(n.unseen for n in needs))
        wait = next_wait(self.wait_s, found, self.cfg.interval_s, self.cfg.quiet_interval_s)
        if wait != self.wait_s and (wait == self.cfg.interval_s or wait == self.cfg.quiet_interval_s):
            log.debug("monitor: look every %gs -> %gs (%s)", self.wait_s, wait,
                      "something to decide" if busy(found) else "nothing to decide")
        self.wait_s = wait

    def _export(self, i: int, name: str, m: EngineMetrics, inflight: int, backlog: int, now: float) -> None:
        """Engine ``i``'s step, out to the Prometheus gauges and the timeline (where they are on)."""
        metrics_out = self.dispatcher.metrics
        if metrics_out is not None:
            metrics_out.inflight.labels(name).set(inflight)
            metrics_out.cap.labels(name).set(self.states[i].cap)
            metrics_out.healthy.labels(name).set(1)
            for gauge, value in ((metrics_out.kv_usage, m.kv_usage), (metrics_out.preemptions, m.preemptions_total),
                                 (metrics_out.tokens_per_s, self.states[i].throughput)):
                if value is not None:
                    gauge.labels(name).set(value)
        if self.timeline is not None:
            self.timeline.sample(now, name, inflight=inflight, cap=self.states[i].cap, queued=backlog,
                                 kv_usage=m.kv_usage, running=m.running, waiting=m.waiting,
                                 preemptions=m.preemptions_total, tokens_per_s=self.states[i].throughput)

    def _judge_stragglers(self, rates: list[EngineRate], backlog: int) -> None:
        """Straggler-aware placement (pool/policy/straggler.py): routing weighs each engine's speed; at a step's end
        the work on slow engines moves to the others."""
        if self.cfg.mode == ControllerMode.off or not self.cfg.straggler_moves:
            return
        speeds = judge_speeds(self.speeds, rates)
        for i, (old, new) in enumerate(zip(self.speeds, speeds)):
            if abs(new - old) > 1e-9:
                self.dispatcher.set_speed(i, new)
            if (old >= self.cfg.slow_below) != (new >= self.cfg.slow_below):
                name = self.clients[i].name
                log.info("%s: %s -> %s (decodes at %.0f%% of the fleet's speed)", name,
                         "normal" if old >= self.cfg.slow_below else "slow",
                         "normal" if new >= self.cfg.slow_below else "slow", 100 * new)
        self.speeds = speeds
        shares = []
        for i in range(len(speeds)):
            inflight, cap, _, healthy = self.dispatcher.engine_state(i)
            shares.append(EngineShare(i, speeds[i], inflight, cap, healthy))
        slow = frozenset(i for i, v in enumerate(speeds) if v < self.cfg.slow_below)
        for i, samples in plan_moves(shares, backlog, self.cfg.slow_below).items():
            moved = self.dispatcher.move_calls(i, samples, avoid=slow)
            if moved:
                self.moved += moved
                log.info("%s: moving %d sample(s) to faster engines (%.0f%% of the fleet's speed, queue empty)",
                         self.clients[i].name, moved, 100 * speeds[i])

    def _spread_tail(self, rates: list[EngineRate], backlog: int) -> None:
        """At a step's end, idle engines take calls off crowded ones (pool/policy/spread.py)."""
        if self.cfg.mode == ControllerMode.off or not self.cfg.tail_spread or backlog > 0:
            return
        movable, calls = self.dispatcher.movable_calls()
        shares = []
        for i, r in enumerate(rates[:len(movable)]):
            inflight, cap, _, healthy = self.dispatcher.engine_state(i)
            slow = i < len(self.speeds) and self.speeds[i] < self.cfg.slow_below
            running = r.running if r.running is not None else inflight
            shares.append(TailShare(i, running, inflight, movable[i], calls[i], healthy and r.healthy, slow,
                                    batch_bound(self.fit, running), cap))
        for i, calls in plan_spread(shares, backlog).items():
            samples = self.dispatcher.spread_calls(i, calls)
            self.spread += samples
            log.info("%s: moving %d call(s) (%d sample(s)) to idle engines (%d decoding, queue empty; %s)",
                     self.clients[i].name, calls, samples, shares[i].running,
                     "a step shrinks with its batch: up to an even split" if shares[i].batch_bound else "one each")

    def _tune_pack(self, now: float, backlog: int, tokens: float) -> None:
        """Pool-wide: one pack size for every engine, scored by all engines' output tokens/s."""
        if self.cfg.mode == ControllerMode.off or self.cfg.pack.mode == ControllerMode.off:
            return
        self.pack, decision = pack_step(self.pack, PackObservation(now, tokens, backlog), self.cfg.pack)
        if decision.changed:
            self.dispatcher.set_pack_size(decision.size, decision.reason or "")
            self.pack_changes += 1

    async def _check_silent(self, metrics: list[EngineMetrics]) -> None:
        """An engine that served /metrics and now does not may hang (SIGSTOP, a wedged GPU): probe it."""
        silent = [i for i, (before, now) in enumerate(zip(self.latest, metrics))
                  if before != EngineMetrics() and now == EngineMetrics() and self.dispatcher.engine_state(i)[3]]
        if not silent:
            return
        alive = await asyncio.gather(*(looks_healthy(self.clients[i]) for i in silent), return_exceptions=True)
        alive = [a is True for a in alive]
        for i, ok in zip(silent, alive):
            if not ok:
                self.dispatcher.mark_dead(i, "no answer to /metrics or /health within engine timeout")

    async def first_look(self) -> None:
        """One observation before any work is admitted: the KV-based first caps apply from the first
        request, not after up to the preset cap has gone out. A failure here only leaves the presets."""
        try:
            metrics, timing = await self._scrape()
            self.observe(metrics, timing=timing)
        except Exception as exc:  # the loop retries every interval; nothing here may fail the pool
            log.warning("monitor: first look failed (%s: %s); caps start at the presets", type(exc).__name__, exc)

    async def run(self) -> None:
        """Observe every ``interval_s`` until cancelled. A failing round is logged and skipped (caps hold);
        it never stops the pool."""
        failing = False
        while True:
            try:
                metrics, timing = await self._scrape()
                await self._check_silent(metrics)
                self.observe(metrics, timing=timing)
            except Exception as exc:  # a bad scrape or a bug in one round: degrade, keep the caps, try again
                self.wait_s = self.cfg.interval_s
                if not failing:
                    log.warning("monitor: observing -> degraded (%s: %s); caps hold until it recovers",
                                type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                failing = True
            else:
                if failing:
                    log.info("monitor: degraded -> observing")
                failing = False
            await self._pause()

    def _idle_engines(self) -> tuple[frozenset[int], bool]:
        """The healthy engines the pool has nothing on, and whether some engine holds several samples."""
        idle, crowded = set(), False
        for i in range(len(self.clients)):
            inflight, _, _, healthy = self.dispatcher.engine_state(i)
            if healthy and inflight == 0:
                idle.add(i)
            crowded = crowded or inflight >= MIN_CROWD
        return frozenset(idle), crowded

    def _tail_opened(self) -> bool:
        if self.cfg.mode == ControllerMode.off or not self.cfg.tail_spread:
            return False
        idle, crowded = self._idle_engines()
        opened = tail_opened(idle, self.idle_seen, self.dispatcher.backlog_samples, crowded)
        self.idle_seen &= idle  # an engine seen busy since the last look counts as new when it goes idle
        return opened

    async def _pause(self) -> None:
        """Wait ``wait_s`` in steps of ``interval_s``, ending early when work queues or a step's tail opens (no
        I/O per step)."""
        waited = 0.0
        while True:
            await asyncio.sleep(self.cfg.interval_s)  # the poll period itself, not a synchronisation
            waited += self.cfg.interval_s
            if waited >= self.wait_s - 1e-9 or urgent(self.dispatcher.backlog_samples) or self._tail_opened():
                return
