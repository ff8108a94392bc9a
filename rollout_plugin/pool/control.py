"""Adaptive per-engine concurrency: observations in, caps out (a pure state machine, no I/O, no clock).

One controller state per engine. Each poll interval the pool hands it what it saw (the engine's
Prometheus gauges and counters when it has them, client-side counts always) and gets back the cap
to enforce, with the reason. The rules, in order:

1. preemptions rose since the last look  -> cut (the engine is evicting KV: too many sequences);
2. KV usage above ``kv_high``              -> cut before preemptions start;
3. work waits in the pool, the engine is at its cap and nothing waits inside the engine, and
   throughput rose with the last raise     -> raise (multiplicative), but never back up to a cap
                                              that met KV pressure (no flapping);
4. otherwise hold.

Caps never leave ``[floor, max_cap]``; the floor is at least one GRPO group, so an engine always
has work while the pool has any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rollout_plugin.config.schema import ControllerConfig, ControllerMode


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


@dataclass(frozen=True)
class ControlState:
    cap: int
    floor: int
    ceiling: int
    last_t: float | None = None
    last_tokens: float | None = None
    last_preemptions: float | None = None
    throughput: float | None = None  # tokens/s over the last interval
    throughput_at_raise: float | None = None  # tokens/s measured before the last raise
    plateau: bool = False  # the last raise bought nothing: hold until something changes
    pressure_cap: int | None = None  # lowest cap that met KV pressure: raises stay below it


@dataclass(frozen=True)
class Decision:
    cap: int
    old: int
    reason: str | None  # None: nothing changed

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


def kv_estimate_cap(preset_cap: int, kv_tokens: int | None, expected_tokens: int, ratio: float) -> tuple[int, str]:
    """First cap: the preset, unless the engine's KV cache holds fewer sequences of the expected size."""
    if not kv_tokens or expected_tokens <= 0:
        return preset_cap, "preset by context length"
    fits = max(1, kv_tokens // expected_tokens)
    est = math.ceil(fits * ratio)
    if est < preset_cap:
        return est, f"KV holds {kv_tokens} tokens = {fits} sequences of {expected_tokens} tokens (×{ratio})"
    return preset_cap, "preset by context length (KV has room for more)"


def step(state: ControlState, obs: Observation, cfg: ControllerConfig) -> tuple[ControlState, Decision]:
    """Advance one engine's controller by one observation."""
    old = state.cap
    throughput = state.throughput
    if state.last_t is not None and obs.t > state.last_t and state.last_tokens is not None:
        throughput = max(0.0, (obs.tokens_total - state.last_tokens) / (obs.t - state.last_t))
    preempted = (obs.preemptions_total - state.last_preemptions
                 if obs.preemptions_total is not None and state.last_preemptions is not None else 0.0)
    nxt = replace(state, last_t=obs.t, last_tokens=obs.tokens_total, last_preemptions=obs.preemptions_total,
                  throughput=throughput)
    if cfg.mode == ControllerMode.off:
        return nxt, Decision(old, old, None)

    cap, reason = old, None
    if preempted > 0:
        cap, reason = math.floor(old * cfg.cut_factor), f"preemptions +{preempted:g}"
    elif obs.kv_usage is not None and obs.kv_usage > cfg.kv_high:
        cap, reason = math.floor(old * cfg.cut_factor), f"KV usage {obs.kv_usage:.0%} > {cfg.kv_high:.0%}"
    elif obs.backlog > 0 and obs.inflight >= cfg.at_cap_fraction * old and not obs.waiting and throughput:
        gained = state.throughput_at_raise is None or throughput >= state.throughput_at_raise * (1 + cfg.min_gain)
        if gained and not state.plateau:
            cap = math.ceil(old * cfg.raise_factor)
            if state.pressure_cap is not None:
                cap = min(cap, state.pressure_cap - 1)
            reason = f"throughput {throughput:.0f} tok/s rising, {obs.backlog} samples waiting, engine queue empty"
            nxt = replace(nxt, throughput_at_raise=throughput)
        elif not gained:
            nxt = replace(nxt, plateau=True)
    if reason is not None and reason.startswith(("preemptions", "KV")):
        # Conditions changed: probe upward again, but never back to a cap that met pressure (no flapping).
        pressure = old if state.pressure_cap is None else min(old, state.pressure_cap)
        nxt = replace(nxt, plateau=False, throughput_at_raise=None, pressure_cap=pressure)

    cap = min(max(cap, state.floor), state.ceiling)
    if cap == old:
        return replace(nxt, throughput_at_raise=state.throughput_at_raise), Decision(old, old, None)
    return replace(nxt, cap=cap), Decision(cap, old, reason)
