"""Engine telemetry: vLLM's Prometheus ``/metrics`` text parsed into the few numbers policy needs.

Parsing is pure (text in, :class:`EngineMetrics` out); fetching goes through the engine client.
Engines without metrics (hosted APIs) give ``None`` and the controller falls back to client counts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineMetrics:
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # 0..1
    preemptions_total: float | None = None
    generation_tokens_total: float | None = None
    prompt_tokens_total: float | None = None
    kv_tokens: int | None = None  # KV cache capacity in tokens (num blocks × block size)
    # Histogram sums and counts: tokens per engine step, and seconds between a sequence's tokens (a decode step).
    step_tokens_sum: float | None = None
    steps_total: float | None = None
    itl_sum: float | None = None
    itl_count: float | None = None


_SUMS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_preemptions_total": "preemptions_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:iteration_tokens_total_sum": "step_tokens_sum",
    "vllm:iteration_tokens_total_count": "steps_total",
    "vllm:inter_token_latency_seconds_sum": "itl_sum",
    "vllm:inter_token_latency_seconds_count": "itl_count",
}


_READ = (*_SUMS, "vllm:kv_cache_usage_perc", "vllm:cache_config_info")
# A sample line of a series the monitor reads: its name, then its labels or its value.
_READ_LINE = re.compile("^(?:" + "|".join(re.escape(name) for name in _READ) + ")[{ ]")


def read_lines(text: str) -> str:
    """Only the sample lines of the series read here. vLLM 0.32's /metrics is ~600 lines (42 families, 18
    histograms); parsing all of it took 10–15 ms of the pool's CPU per look, these ~10 lines 0.3 ms
    (benchmarks/control_plane_cost.py; docs/scale.md: at 1,024 engines the difference is 10–16 cores)."""
    return "".join(line + "\n" for line in text.splitlines() if _READ_LINE.match(line))


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Sum each metric over its label sets (one engine may report per-model or per-DP-rank series)."""
    sums: dict[str, float] = {}
    kv: list[float] = []
    kv_tokens: int | None = None
    try:
        families = list(text_string_to_metric_families(read_lines(text)))
    except ValueError as exc:
        log.debug("unparseable /metrics: %s", exc)
        return EngineMetrics()
    for family in families:
        for sample in family.samples:
            if sample.name in _SUMS:
                sums[_SUMS[sample.name]] = sums.get(_SUMS[sample.name], 0.0) + sample.value
            elif sample.name == "vllm:kv_cache_usage_perc":
                kv.append(sample.value)
            elif sample.name == "vllm:cache_config_info":
                blocks, size = sample.labels.get("num_gpu_blocks"), sample.labels.get("block_size")
                if blocks and size and blocks.isdigit() and size.isdigit():
                    kv_tokens = int(blocks) * int(size)
    return EngineMetrics(
        running=int(sums["running"]) if "running" in sums else None,
        waiting=int(sums["waiting"]) if "waiting" in sums else None,
        kv_usage=max(kv) if kv else None,
        preemptions_total=sums.get("preemptions_total"),
        generation_tokens_total=sums.get("generation_tokens_total"),
        prompt_tokens_total=sums.get("prompt_tokens_total"),
        kv_tokens=kv_tokens,
        step_tokens_sum=sums.get("step_tokens_sum"),
        steps_total=sums.get("steps_total"),
        itl_sum=sums.get("itl_sum"),
        itl_count=sums.get("itl_count"),
    )


MIN_STEPS = 8  # engine steps in a window before its mean batch and step time count as a measurement


def step_point(before: EngineMetrics, after: EngineMetrics) -> tuple[float, float] | None:
    """(mean tokens per engine step, mean seconds per decode step) between two looks, from vLLM's histograms
    (``iteration_tokens_total``, ``inter_token_latency_seconds``): exact for the steps taken, however long the
    engine idled in the window. None without the series, or with fewer than :data:`MIN_STEPS` steps."""
    counters = (before.step_tokens_sum, before.steps_total, before.itl_sum, before.itl_count,
                after.step_tokens_sum, after.steps_total, after.itl_sum, after.itl_count)
    if any(c is None for c in counters):
        return None
    steps, itls = after.steps_total - before.steps_total, after.itl_count - before.itl_count
    if steps < MIN_STEPS or itls <= 0:
        return None
    return (after.step_tokens_sum - before.step_tokens_sum) / steps, (after.itl_sum - before.itl_sum) / itls
