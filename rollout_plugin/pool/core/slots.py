"""One engine as the dispatcher sees it: its client, cap, lifecycle state and counters (no policy, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rollout_plugin.pool.core.engine_client import EngineClient, Generation
from rollout_plugin.pool.core.lifecycle import EngineState
from rollout_plugin.pool.policy.ratelimit import RateLimiter
from rollout_plugin.pool.observe.stats import EngineStats

__all__ = ["EngineSlot"]


@dataclass(eq=False)
class EngineSlot:
    """In-flight samples are the ledger's (one source of truth); these are the engine's own facts."""

    index: int
    client: EngineClient
    cap: int  # samples allowed in flight (the controller moves it)
    # Its place in the engine state machine (:mod:`.lifecycle`); only Membership moves it, through the table.
    state: EngineState = EngineState.live
    why: str = "started"  # the reason of the last transition (errors quote it)
    before: EngineState = EngineState.absent  # the state it came from (stale after a failed refit is stuck)
    limiter: RateLimiter | None = None  # hosted APIs: RPM/TPM token buckets
    speed: float = 1.0  # decode speed against the fleet (the monitor's verdict, pool/policy/straggler.py): routing weighs it
    version: int = 0  # the weights it holds (engine-reported when it can say; results carry it)
    version_unknown: bool = True  # never read back from the engine: follows the pool's version
    calls: int = 0
    requests: int = 0
    samples: int = 0
    output_tokens: int = 0
    failed_calls: int = 0
    output_tokens_all: int = 0  # never reset: the controller's client-side throughput signal
    area: float = 0.0  # ∫ in-flight dt since the last reset, for the mean
    since: float = 0.0
    peak: int = 0

    # Derived from ``state`` (one source of truth); the names readers used when these were flags.
    @property
    def available(self) -> bool:
        """In rotation: new calls may go here."""
        return self.state is EngineState.live

    @property
    def healthy(self) -> bool:
        """In rotation, or out only while a probe decides (what stats and the monitor count as up)."""
        return self.state in (EngineState.live, EngineState.suspect)

    @property
    def suspect(self) -> bool:
        return self.state is EngineState.suspect

    @property
    def recovering(self) -> bool:
        return self.state is EngineState.restarting

    @property
    def stale(self) -> bool:
        """Waiting for a refit (not one under way)."""
        return self.state is EngineState.stale

    def account(self, before: int, after: int, now: float) -> None:
        """In-flight samples changed from ``before`` to ``after`` at ``now``."""
        self.area += before * (now - self.since)
        self.since = now
        self.peak = max(self.peak, after)

    def delivered(self, generations: Sequence[Generation]) -> None:
        tokens = sum(g.output_tokens for g in generations)
        self.calls += 1
        self.requests += len(generations)
        self.samples += sum(len(g.samples) for g in generations)
        self.output_tokens += tokens
        self.output_tokens_all += tokens

    def reset(self, inflight: int, now: float) -> None:
        self.area, self.since, self.peak = 0.0, now, inflight
        self.calls = self.requests = self.samples = self.output_tokens = self.failed_calls = 0

    def stats(self, inflight: int, now: float, elapsed: float) -> EngineStats:
        mean = (self.area + inflight * (now - self.since)) / elapsed
        return EngineStats(self.client.name, self.healthy, inflight, self.cap, self.calls, self.requests, self.samples,
                           self.output_tokens, self.failed_calls, mean, self.peak, state=self.state.value)
