"""Adaptive per-engine concurrency: observations in, caps out (a pure state machine, no I/O, no clock).

One controller state per engine. Each poll interval the pool hands it what it saw (the engine's
Prometheus gauges and counters when it has them, client-side counts always) and gets back the cap
to enforce, with the reason. Caps are judged by what they buy: each cap keeps a *record*, its
tokens/s while it limited the engine (work waiting in the pool, in-flight samples at the cap), and
every rule compares records. The rules, in order:

1. a cut on trial is judged ``trial_s`` after it bites (in-flight samples down to the new cap): if
   tokens/s fell by more than ``cut_tolerance`` against the record before the cut, the cut is undone
   and preemption counts as cheap on this engine for ``cheap_s`` (doubled each time it is found
   again): no cut on preemptions alone until then, and raises may go on while the engine queues.
   Otherwise the cut stands (recompute preemption wasted more than the cut cost) and raises stay
   below the cap that met the pressure;
2. preemptions rose, or KV usage is above ``kv_high``, while work waits in the pool:
   - during slow start (below), probe upward first: the first cap is only an estimate;
   - if this cap's record, pressure and all, beats the record of a lower cap measured earlier, the
     pressure is worth its cost: no cut, preemption counts as cheap;
   - else, unless what is left to dispatch fits in the cap (a cut would only stretch the tail), a
     cut on trial, to ``cut_factor`` × what the engine runs now (a cut above that only moves the
     engine's own queue into the pool);
3. work waits in the pool and the engine is at its cap (its own queue empty, unless preemption is
   cheap here or in slow start) -> raise while each raise buys ``min_gain`` more tokens/s:
   ×``probe_factor`` from the start until the first raise that doesn't (slow start), then
   ×``raise_factor``. A raise that cost more than ``raise_tolerance`` is undone; one that bought
   nothing stays (never worse than sending more), and raising stops until ``reprobe_s`` has passed;
4. otherwise hold.

The tolerances lean upward (a cut must pay clearly to stand, a raise must cost clearly to be undone):
short windows on a shared machine are noisy, and the error to avoid is holding an engine below what
it can run. Caps never leave ``[floor, ceiling]``, except that a cap never stays below ``need`` (the
largest request waiting in the pool), even with nothing in flight: a request no cap fits would
otherwise wait forever. The floor is at least one GRPO group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rollout_plugin.config.schema import ControllerConfig, ControllerMode

__all__ = ["ControlState", "Decision", "Observation", "Progress", "Trial", "fresh", "initial_state", "kv_estimate_cap",
           "step", "watch_progress"]


@dataclass(frozen=True)
class Observation:
    """What the pool saw of one engine at time ``t`` (seconds, from any monotonic clock)."""

    t: float
    inflight: int  # samples in flight from this client
    backlog: int  # samples queued in the pool, waiting for capacity anywhere
    tokens_total: float  # output tokens so far (engine counter if it has one, else client count)
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # 0..1
    preemptions_total: float | None = None
    need: int = 0  # samples (n) of the largest request waiting in the pool; 0: none, or unknown
    lag: float = 0.0  # seconds between asking for these numbers and their answer (t is the answer's time)


@dataclass(frozen=True)
class Trial:
    """A protective cut on trial: it stands only if tokens/s held up once it bit."""

    from_cap: int
    before: float  # the record of ``from_cap``
    t: float | None = None  # when the cut bit (in flight down to the new cap); None: not yet
    tokens: float = 0.0  # the token counter then


@dataclass(frozen=True)
class ControlState:
    cap: int
    floor: int
    ceiling: int
    last_t: float | None = None
    last_tokens: float | None = None
    last_preemptions: float | None = None
    throughput: float | None = None  # tokens/s over the last interval
    throughput_at_raise: float | None = None  # the record of the cap before the last raise
    plateau: bool = False  # the last raise bought nothing: hold until reprobe_s has passed
    pressure_cap: int | None = None  # lowest cap that met KV pressure: raises stay below it
    # The current cap's record: the stretch since it began limiting the engine.
    since_t: float | None = None
    since_tokens: float | None = None
    records: tuple[tuple[int, float], ...] = ()  # (cap, record) of caps measured, newest last
    trial: Trial | None = None
    cheap_until: float | None = None  # pressure was found cheap here: no cut on it alone until then
    cheap_found: int = 0  # times pressure was found cheap: each doubles how long the verdict holds
    plateau_t: float | None = None
    raised_from: int | None = None  # the cap before the last raise (where an undo goes)
    slow_start: bool = True  # raises double until the first one that doesn't pay


@dataclass(frozen=True)
class Decision:
    cap: int
    old: int
    reason: str | None  # why the cap moved, or a verdict that left it (a cut that stands); None: nothing decided

    @property
    def changed(self) -> bool:
        return self.cap != self.old


@dataclass(frozen=True)
class Progress:
    """An engine's token counter (prompt + generated) and when it last moved while work was in flight."""

    tokens: float
    since: float


def watch_progress(prev: Progress | None, tokens: float | None, inflight: int, t: float,
                   stall_s: float) -> tuple[Progress | None, bool]:
    """Hang detection from the engine's own counters: ``(next state, stalled)``.

    A hung engine core (SIGSTOP, a wedged GPU) can leave the API process answering /health and
    /metrics with frozen counters, so liveness alone can't see it; work in flight with no token
    counted for ``stall_s`` can. Idle engines and engines without metrics are never judged.
    """
    if tokens is None or inflight <= 0:
        return None, False
    if prev is None or tokens != prev.tokens:
        return Progress(tokens, t), False
    return prev, t - prev.since >= stall_s


def initial_state(cap: int, cfg: ControllerConfig, group_size: int, preset: int | None = None) -> ControlState:
    """``cap`` to start from; the default ceiling is twice the ``preset`` (the configured cap), not twice a
    (possibly far lower) KV-based first estimate, so a low first guess can still climb to what the engine holds."""
    floor = max(cfg.min_cap, group_size)
    ceiling = max(floor, cfg.max_cap if cfg.max_cap is not None else 2 * max(cap, preset or 0))
    return ControlState(cap=min(max(cap, floor), ceiling), floor=floor, ceiling=ceiling)


def kv_estimate_cap(preset_cap: int, kv_tokens: int | None, expected_tokens: int, ratio: float,
                    upper: int | None = None) -> tuple[int, str]:
    """First cap: what the engine's KV cache holds of sequences of the expected size (× ``ratio``), below the
    preset when it holds fewer; above it, up to ``upper`` (the engine's batch limit × ratio), when it holds
    more: the context-length preset is a starting point, not a ceiling. ``upper`` None: never above it."""
    if not kv_tokens or expected_tokens <= 0:
        return preset_cap, "preset by context length"
    fits = max(1, kv_tokens // expected_tokens)
    est = math.ceil(fits * ratio)
    why = f"KV holds {kv_tokens} tokens = {fits} sequences of {expected_tokens} tokens (×{ratio})"
    if est < preset_cap:
        return est, why
    if upper is not None and est > preset_cap and upper > preset_cap:
        return min(est, upper), why + (f", up to the batch limit {upper}" if est > upper else "")
    return preset_cap, "preset by context length (KV has room for more)"


def fresh(state: ControlState, obs: Observation, cfg: ControllerConfig) -> bool:
    """Is ``obs`` a measurement? Not when its answer came late (``lag`` above ``max_scrape_lag`` of the window
    since the last measurement: the counters are from some moment in that lag, so a rate over the window is
    off by as much), nor when the window is shorter than half the interval, or half a second if the interval
    is longer (two looks back to back: noise). The first look always is."""
    if state.last_t is None:
        return True
    window = obs.t - state.last_t
    return window >= 0.5 * min(cfg.interval_s, 1.0) and obs.lag <= cfg.max_scrape_lag * window


MAX_RECORDS = 8  # caps whose record is kept (the newest)


def _rate(tokens0: float | None, t0: float | None, obs: Observation) -> float | None:
    if tokens0 is None or t0 is None or obs.t <= t0:
        return None
    return max(0.0, obs.tokens_total - tokens0) / (obs.t - t0)


def _measure(state: ControlState, obs: Observation, cfg: ControllerConfig) -> tuple[ControlState, float]:
    """Fold the observation's counters into the state; returns it and the preemptions since the last look."""
    throughput = _rate(state.last_tokens, state.last_t, obs)
    preempted = (obs.preemptions_total - state.last_preemptions
                 if obs.preemptions_total is not None and state.last_preemptions is not None else 0.0)
    nxt = replace(state, last_t=obs.t, last_tokens=obs.tokens_total, last_preemptions=obs.preemptions_total,
                  throughput=state.throughput if throughput is None else throughput)
    # The record counts only while the cap is what limits the engine: work waits in the pool and
    # in-flight samples sit at the cap (not below it: demand-bound; not above it: draining after a cut).
    bound = obs.backlog > 0 and cfg.at_cap_fraction * state.cap <= obs.inflight <= state.cap
    if not bound:  # the window starts at the first look that finds the cap binding, not before (a ramp's
        return replace(nxt, since_t=None, since_tokens=None), preempted  # prefill would read as 0 tok/s)
    if state.since_t is None:
        return replace(nxt, since_t=obs.t, since_tokens=obs.tokens_total), preempted
    record = _rate(state.since_tokens, state.since_t, obs)
    if record is not None and obs.t - state.since_t >= cfg.interval_s:
        kept = tuple((c, r) for c, r in state.records if c != state.cap)[-(MAX_RECORDS - 1):]
        nxt = replace(nxt, records=kept + ((state.cap, record),))
    return nxt, preempted


def _record(state: ControlState, obs: Observation, min_s: float = 0.0) -> float | None:
    """The current cap's record; None before ``min_s`` of it."""
    if state.since_t is None or obs.t - state.since_t < max(min_s, 1e-9):
        return None
    return _rate(state.since_tokens, state.since_t, obs)


def _judge(state: ControlState, obs: Observation, cfg: ControllerConfig) -> tuple[ControlState, int, str | None]:
    """Follow the cut on trial: start its clock when it bites, undo it if tokens/s fell ``trial_s`` later."""
    trial = state.trial
    if trial is None:
        return state, state.cap, None
    if obs.backlog <= 0:  # nothing left to dispatch: the cap no longer matters, there is nothing to judge
        return replace(state, trial=None), state.cap, None
    if trial.t is None:
        if obs.inflight > state.cap:
            return state, state.cap, None
        return replace(state, trial=replace(trial, t=obs.t, tokens=obs.tokens_total)), state.cap, None
    after = _rate(trial.tokens, trial.t, obs)
    if obs.t - trial.t < cfg.trial_s or after is None:
        return state, state.cap, None
    closed = replace(state, trial=None)
    if after >= trial.before * (1 - cfg.cut_tolerance):
        return closed, state.cap, f"the cut to {state.cap} stands ({trial.before:.0f} -> {after:.0f} tok/s)"
    cheap, hold = _cheap(closed, obs, cfg)
    reason = (f"the cut to {state.cap} cost tokens/s ({trial.before:.0f} -> {after:.0f}): back to {trial.from_cap}; "
              f"preemption is cheap here, no cut on it alone for {hold:g} s")
    return replace(cheap, plateau=False, throughput_at_raise=None), trial.from_cap, reason


def _cheap(state: ControlState, obs: Observation, cfg: ControllerConfig) -> tuple[ControlState, float]:
    """Pressure found cheap (again): no cut on it alone for cheap_s, doubled with each finding."""
    hold = cfg.cheap_s * 2 ** min(state.cheap_found, 6)
    return replace(state, cheap_until=obs.t + hold, cheap_found=state.cheap_found + 1, pressure_cap=None), hold


def _pressure(preempted: float, obs: Observation, cfg: ControllerConfig) -> str | None:
    if preempted > 0:
        return f"preemptions +{preempted:g}"
    if obs.kv_usage is not None and obs.kv_usage > cfg.kv_high:
        return f"KV usage {obs.kv_usage:.0%} > {cfg.kv_high:.0%}"
    return None


def _on_pressure(state: ControlState, obs: Observation, why: str,
                 cfg: ControllerConfig) -> tuple[ControlState, int, str | None]:
    old, now = state.cap, _record(state, obs)
    if now is None:  # the cap isn't what limits the engine: a cut would act on nothing and could not be judged
        return state, old, None
    lower = max(((c, r) for c, r in state.records if c < old), default=None)
    if lower is not None and now >= lower[1] * (1 + cfg.min_gain):
        # Measured: this cap, pressure and all, buys more than a lower one did.
        cheap, hold = _cheap(state, obs, cfg)
        return cheap, old, (f"{why}, but {old} buys {now:.0f} tok/s vs {lower[1]:.0f} at {lower[0]}: "
                            f"preemption is cheap here, no cut on it alone for {hold:g} s")
    if obs.backlog < old:  # what is left fits in the cap: a cut now would only stretch the step's tail
        return state, old, None
    running = obs.running if obs.running is not None else obs.inflight
    cap = math.floor(max(1, min(old, obs.inflight, running)) * cfg.cut_factor)
    pressure = old if state.pressure_cap is None else min(old, state.pressure_cap)
    nxt = replace(state, trial=Trial(old, now), pressure_cap=pressure, plateau=False, throughput_at_raise=None,
                  slow_start=False)
    return nxt, cap, f"{why}: cut on trial ({now:.0f} tok/s at {old}; undone if tokens/s falls once it bites)"


def _raise(state: ControlState, obs: Observation, cfg: ControllerConfig,
           cheap: bool) -> tuple[ControlState, int, str | None]:
    old = state.cap
    if state.plateau and state.plateau_t is not None and obs.t - state.plateau_t >= cfg.reprobe_s:
        state = replace(state, plateau=False, throughput_at_raise=None)  # conditions may have changed: look again
    tar = state.throughput_at_raise
    # A raise is judged on trial_s of record at the new cap (a shorter one is mostly the ramp after it).
    now = _record(state, obs, cfg.trial_s if tar is not None else 0.0)
    if now is None:
        return state, old, None
    if tar is not None and now < tar * (1 + cfg.min_gain):  # the last raise bought too little: settle
        state = replace(state, plateau=True, plateau_t=obs.t, slow_start=False, throughput_at_raise=None)
        if state.raised_from is None or state.raised_from >= old or now >= tar * (1 - cfg.raise_tolerance):
            return state, old, None
        back = state.raised_from
        return replace(state, raised_from=None), back, (
            f"the raise to {old} cost tokens/s ({tar:.0f} -> {now:.0f}): back to {back}")
    if state.plateau:
        return state, old, None
    cap = min(math.ceil(old * (cfg.probe_factor if state.slow_start else cfg.raise_factor)), state.ceiling)
    if state.pressure_cap is not None and not cheap:
        cap = min(cap, state.pressure_cap - 1)
    if cap <= old:  # at the ceiling (or below a cap that met pressure): slow start is over
        return replace(state, slow_start=False), old, None
    queue = "engine queue empty" if not obs.waiting else f"{obs.waiting} queued in the engine"
    gain = f"up from {tar:.0f} with the last raise" if tar is not None else "probing"
    return replace(state, throughput_at_raise=now, raised_from=old), cap, (
        f"{now:.0f} tok/s at {old} ({gain}), {obs.backlog} samples waiting, {queue}")


def _decide(state: ControlState, obs: Observation, preempted: float,
            cfg: ControllerConfig) -> tuple[ControlState, int, str | None, bool]:
    """Rules 2-4 (no trial under way): ``(state, cap, reason, opened a trial)``."""
    cheap = state.cheap_until is not None and obs.t < state.cheap_until
    why = None if cheap else _pressure(preempted, obs, cfg)
    can_raise = obs.backlog > 0 and obs.inflight >= cfg.at_cap_fraction * state.cap
    if can_raise and (state.slow_start or (why is None and (not obs.waiting or cheap))):
        nxt, cap, reason = _raise(state, obs, cfg, cheap)
        if cap != state.cap or why is None or nxt.slow_start:
            return nxt, cap, reason if why is None or cap <= state.cap else f"{reason}; {why}", False
        state = nxt  # slow start just ended on a raise that didn't pay: the pressure rules apply now
    if why is None:
        return state, state.cap, None, False
    nxt, cap, reason = _on_pressure(state, obs, why, cfg)
    return nxt, cap, reason, nxt.trial is not None


def step(state: ControlState, obs: Observation, cfg: ControllerConfig) -> tuple[ControlState, Decision]:
    """Advance one engine's controller by one observation (one that is no measurement changes nothing but
    the floor: :func:`fresh`)."""
    old = state.cap
    if not fresh(state, obs, cfg):
        if obs.need > old:
            return replace(state, cap=obs.need), Decision(obs.need, old, f"a waiting request needs {obs.need} samples")
        return state, Decision(old, old, None)
    nxt, preempted = _measure(state, obs, cfg)
    cap, reason, opened = old, None, False
    if cfg.mode != ControllerMode.off:
        nxt, cap, reason = _judge(nxt, obs, cfg)
        if nxt.trial is None and reason is None:  # (a verdict is this step's decision)
            nxt, cap, reason, opened = _decide(nxt, obs, preempted, cfg)
        cap = min(max(cap, nxt.floor), nxt.ceiling)
    if obs.need > cap:  # never below the largest waiting request, even over the ceiling: it would wait forever
        cap, reason = obs.need, f"a waiting request needs {obs.need} samples" + (f" ({reason})" if reason else "")
    if opened and cap == old:
        nxt, reason = replace(nxt, trial=None), None  # the cut didn't happen (the floor): nothing to judge
    elif nxt.trial is not None and cap > old:
        nxt = replace(nxt, trial=None)  # need overrode the cut
    if cap == old:
        return nxt, Decision(old, old, reason)
    # A new cap starts a new record at this look (the pool fills a raise at once; a cut's window restarts at
    # the first look it binds, once the engines have drained to it).
    return replace(nxt, cap=cap, since_t=obs.t, since_tokens=obs.tokens_total), Decision(cap, old, reason)
