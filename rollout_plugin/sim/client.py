"""The engine-client interface over a simulated engine: the real pool talks to it as to vLLM.

Lengths come from the request: ``metadata["sim_prompt_tokens"]`` (int) and
``metadata["sim_output_tokens"]`` (one length per sample, ``n`` of them); what a real engine
decides by sampling, the workload decides up front, so every policy generates the same tokens.
A dead engine fails its calls as a dropped connection does (retryable, suspect), answers
``healthy()`` with False and serves no ``/metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import cache

from rollout_plugin.pool.engine_client import Generation, Unavailable
from rollout_plugin.pool.telemetry import EngineMetrics
from rollout_plugin.sim.engine import EngineDied, SimEngine
from rollout_plugin.types import Request, Sample

PROMPT_KEY = "sim_prompt_tokens"
OUTPUT_KEY = "sim_output_tokens"


@cache
def _sample(length: int) -> Sample:
    # Samples are immutable: one shared instance per length keeps 10⁶ results cheap.
    return Sample(text="", token_ids=(0,) * length, finish_reason="length")


def metrics_text(m: EngineMetrics, model: str = "sim", block_size: int = 16) -> str:
    """What vLLM's ``/metrics`` would say (the few series :func:`parse_vllm_metrics` reads)."""
    lab = f'{{model_name="{model}"}}'
    return "\n".join([
        f"vllm:num_requests_running{lab} {m.running}",
        f"vllm:num_requests_waiting{lab} {m.waiting}",
        f"vllm:kv_cache_usage_perc{lab} {m.kv_usage}",
        f"vllm:num_preemptions_total{lab} {m.preemptions_total}",
        f"vllm:generation_tokens_total{lab} {m.generation_tokens_total}",
        f"vllm:prompt_tokens_total{lab} {m.prompt_tokens_total}",
        f'vllm:cache_config_info{{block_size="{block_size}",num_gpu_blocks="{(m.kv_tokens or 0) // block_size}"}} 1.0',
        "",
    ])


class MetricsText(str):
    """Prometheus text that also carries what it says, parsed: the simulator's monitor reads
    ``.parsed`` instead of re-parsing 10³ texts a second (a test checks the two agree)."""

    parsed: EngineMetrics


def _metrics_text(m: EngineMetrics, block_size: int) -> MetricsText:
    text = MetricsText(metrics_text(m, block_size=block_size))
    text.parsed = m
    return text


class SimEngineClient:
    """:class:`rollout_plugin.pool.client.EngineClient` backed by a :class:`SimEngine`."""

    def __init__(self, engine: SimEngine):
        self.engine = engine
        self.name = engine.name

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        prompts = [int(r.metadata[PROMPT_KEY]) for r in requests]
        outputs = [list(r.metadata[OUTPUT_KEY]) for r in requests]
        call = self.engine.submit(prompts, outputs)
        try:
            await call.future
        except EngineDied as exc:
            raise Unavailable(f"{self.name}: {exc} (connection reset)") from None
        except asyncio.CancelledError:
            self.engine.abort(call)
            raise
        return [Generation(tuple(_sample(n) for n in outs), p) for p, outs in zip(prompts, outputs)]

    async def healthy(self) -> bool:
        return self.engine.alive

    def metrics_now(self) -> EngineMetrics | None:
        return self.engine.metrics() if self.engine.alive else None

    async def metrics(self) -> str | None:
        m = self.metrics_now()
        return _metrics_text(m, self.engine.profile.block_size) if m is not None else None

    async def aclose(self) -> None:
        return None
