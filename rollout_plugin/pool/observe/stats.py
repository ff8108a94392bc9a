"""Snapshots of the pool's counters, per engine and in total (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    name: str
    healthy: bool
    inflight: int
    cap: int
    calls: int
    requests: int
    samples: int
    output_tokens: int
    failed_calls: int
    mean_inflight: float
    peak_inflight: int
    state: str = "live"  # its lifecycle state (rollout_plugin.pool.core.lifecycle.EngineState)


@dataclass
class PoolStats:
    elapsed_s: float
    engines: list[EngineStats]
    requests_done: int
    requests_failed: int
    groups_inflight: int  # requests with samples in flight
    queued: int  # units waiting for admission (a request, or a piece of a split group)
    samples_inflight: int = 0
    queued_samples: int = 0
    backing_off: int = 0  # units waiting out a retry delay
    continued: int = 0  # samples that continued from their tokens so far (engine death, weight update)

    @property
    def samples(self) -> int:
        return sum(e.samples for e in self.engines)

    @property
    def output_tokens(self) -> int:
        return sum(e.output_tokens for e in self.engines)
