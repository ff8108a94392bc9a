"""Admission limits from the Xtuner concurrency guide (pure arithmetic, no I/O).

- per-engine cap (``rollout_max_batch_size_per_instance``): preset by context length unless set;
- over-concurrency ratio: send a little more than the engine batches so its queue never runs dry;
- global ``max_concurrent = per_engine × engines / k × ratio`` counted in groups;
- the HTTP client's connection limit = per-engine cap × ratio, so no hidden queue sits in the client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (max context length, per-engine cap): Xtuner's presets, plus 64 beyond 32K.
CAP_PRESETS: tuple[tuple[int, int], ...] = ((4096, 1024), (16384, 512), (32768, 128))
CAP_BEYOND = 64


def preset_per_engine_cap(max_model_len: int) -> int:
    for limit, cap in CAP_PRESETS:
        if max_model_len <= limit:
            return cap
    return CAP_BEYOND


@dataclass(frozen=True)
class Limits:
    """Derived caps for one pool. ``engine_inflight`` is what routing enforces per engine (samples)."""

    per_engine: int  # the engine's batch size (samples); also vLLM's max_num_seqs unless set
    ratio: float
    engines: int
    k: int
    max_concurrent: int  # groups in flight across the pool
    engine_inflight: int  # samples in flight per engine = ceil(per_engine × ratio)
    http_connections: int  # per engine client
    # max_concurrent was derived, not set: the global cap then follows the engines' caps as the controller
    # raises them (a per-engine raise under a fixed global cap only moves work between engines).
    derived_global: bool = False

    @property
    def global_samples(self) -> int:
        return self.max_concurrent * self.k


def derive_limits(*, max_model_len: int, engines: int, k: int, ratio: float,
                  per_engine: int | None = None, max_concurrent: int | None = None,
                  max_num_seqs: int | None = None) -> Limits:
    """Compute the pool's caps; explicit values win over derived ones."""
    if per_engine is None:
        per_engine = preset_per_engine_cap(max_model_len)
        if max_num_seqs is not None:
            # The engine batches no more than max_num_seqs: a larger cap only queues inside vLLM.
            per_engine = min(per_engine, max_num_seqs)
    engine_inflight = max(k, math.ceil(per_engine * ratio))
    derived = max(1, math.floor(per_engine * engines / k * ratio))
    return Limits(
        per_engine=per_engine,
        ratio=ratio,
        engines=engines,
        k=k,
        max_concurrent=max_concurrent if max_concurrent is not None else derived,
        engine_inflight=engine_inflight,
        http_connections=engine_inflight,
        derived_global=max_concurrent is None,
    )
