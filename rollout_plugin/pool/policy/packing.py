"""Pack size from measured cost: a pure hill-climber over the pool's output tokens/s (no I/O, no clock).

A packed multi-prompt call saves per-request overhead in the server (one request per sample reaches
~45 % of the engine's offline throughput here, packs of 64 ~83 %), but a pack returns only when its
longest member ends and holds all its slots until then: with skewed lengths a big pack leaves
finished slots idle. Which effect wins depends on the model, the lengths and the engine, so the
pool measures it: every window in which work waited in the pool (throughput is then the engines',
not the trainer's), it scores the current pack size by tokens/s and tries the neighbour sizes
(halving and doubling within ``[1, max_size]``), settling on the best. A measured score decays
towards new ones (EWMA), so a change in the workload is followed, and a size is left only for a
gain above ``min_gain`` (noise here is ±30 % on short windows; windows are several seconds long).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rollout_plugin.config.schema import PackControlConfig


@dataclass(frozen=True)
class PackObservation:
    t: float  # seconds, any monotonic clock
    tokens_total: float  # output tokens so far, all engines
    backlog: int  # samples waiting in the pool


@dataclass(frozen=True)
class PackState:
    size: int
    max_size: int
    window_start: float | None = None
    tokens_start: float | None = None
    busy: bool = True  # did work wait in the pool during the whole window?
    scores: tuple[tuple[int, float], ...] = ()  # (size, EWMA tokens/s) measured so far
    probe_up: bool = True  # which neighbour to try next
    windows: int = 0


@dataclass(frozen=True)
class PackDecision:
    size: int
    old: int
    reason: str | None = None

    @property
    def changed(self) -> bool:
        return self.size != self.old


def sizes(max_size: int) -> list[int]:
    """Powers of two up to ``max_size``, and ``max_size`` itself."""
    out, s = [], 1
    while s < max_size:
        out.append(s)
        s *= 2
    return out + [max_size]


def initial_pack_state(max_size: int) -> PackState:
    return PackState(size=max_size, max_size=max_size)


def _neighbour(size: int, max_size: int, up: bool) -> int | None:
    ladder = sizes(max_size)
    i = ladder.index(size) if size in ladder else len(ladder) - 1
    j = i + 1 if up else i - 1
    return ladder[j] if 0 <= j < len(ladder) else None


def pack_step(state: PackState, obs: PackObservation, cfg: PackControlConfig) -> tuple[PackState, PackDecision]:
    """Advance by one observation; a decision to change size comes at most once per window."""
    old = state.size
    if state.window_start is None:
        return replace(state, window_start=obs.t, tokens_start=obs.tokens_total, busy=obs.backlog > 0), \
            PackDecision(old, old)
    busy = state.busy and obs.backlog > 0
    if obs.t - state.window_start < cfg.window_s:
        return replace(state, busy=busy), PackDecision(old, old)
    fresh = replace(state, window_start=obs.t, tokens_start=obs.tokens_total, busy=obs.backlog > 0,
                    windows=state.windows + 1)
    if not busy:  # demand-bound window: throughput says nothing about the pack size
        return fresh, PackDecision(old, old)
    # max(0, …): an engine that restarted (or died) takes its counter with it
    rate = max(0.0, obs.tokens_total - (state.tokens_start or 0.0)) / (obs.t - state.window_start)
    scores = dict(state.scores)
    scores[old] = rate if old not in scores else (1 - cfg.decay) * scores[old] + cfg.decay * rate
    fresh = replace(fresh, scores=tuple(sorted(scores.items())))

    # The best size, where sizes within min_gain of the top count as equal and the largest of them
    # wins (fewer calls for the same tokens): noise alone never walks the pack size down.
    top = max(scores.values())
    best = max(s for s, score in scores.items() if score * (1 + cfg.min_gain) >= top)
    if best == old:
        # Measure a neighbour not yet seen (or seen long ago), going on in the direction that
        # last paid off; a worse neighbour sends us straight back after one window.
        for up in (state.probe_up, not state.probe_up):
            nxt = _neighbour(old, state.max_size, up)
            if nxt is not None and (nxt not in scores or fresh.windows % cfg.reprobe_every == 0):
                return replace(fresh, size=nxt, probe_up=up), PackDecision(
                    nxt, old, f"measuring pack {nxt}: pack {old} gives {scores[old]:.0f} tok/s")
        return fresh, PackDecision(old, old)
    return replace(fresh, size=best, probe_up=best > old), PackDecision(
        best, old, f"pack {best} measured {scores[best]:.0f} tok/s vs {scores[old]:.0f} at pack {old}")
