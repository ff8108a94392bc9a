"""The pool's state as a trainer's log metrics: per-interval numbers from successive pool snapshots (the
adapters' log rows; the pool's own Prometheus metrics are :mod:`rollout_plugin.pool.observe.metrics`).

Trainer-neutral: every adapter logs the same ``rollout_pool/*`` names (TRL into its metric buffer; another
trainer into whatever logger it has), so dashboards read the same across trainers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout_plugin.pool import SyncRolloutPool

__all__ = ["PREFIX", "PoolLogMetrics"]

PREFIX = "rollout_pool/"


async def _preemptions(pool: Any) -> float | None:
    monitor = getattr(pool, "monitor", None)
    latest = getattr(monitor, "latest", None) or []
    values = [m.preemptions_total for m in latest if getattr(m, "preemptions_total", None) is not None]
    return float(sum(values)) if values else None


class PoolLogMetrics:
    """Turns successive pool snapshots into per-interval numbers (tokens/s since the previous snapshot)."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def snapshot(self, pool: SyncRolloutPool) -> dict[str, float]:
        stats = pool.stats()
        out: dict[str, float] = {
            "inflight": float(sum(e.inflight for e in stats.engines)),
            "cap": float(sum(e.cap for e in stats.engines)),
            "queued": float(stats.queued),
            "requests_failed": float(stats.requests_failed),
            "engines_healthy": float(sum(e.healthy for e in stats.engines)),
            "weight_version": float(pool.weight_version),
        }
        if self._last is not None and stats.elapsed_s > self._last[0]:
            dt = stats.elapsed_s - self._last[0]
            out["tokens_per_s"] = (stats.output_tokens - self._last[1]) / dt
        self._last = (stats.elapsed_s, stats.output_tokens)
        preempted = pool.run(_preemptions)
        if preempted is not None:
            out["preemptions"] = preempted
        return out
