"""Back-of-envelope rollout throughput: how long one step's generation takes, and how long a request waits.

A roofline decode step, the same shape as the simulator's profiles (``rollout_plugin/sim/profiles``,
``h100_llama8b`` was anchored to published TPOT figures with these efficiencies):

    step_s = weights per GPU ÷ (bandwidth × BW_EFFICIENCY)                       (read once per step)
           + running × 2 × params ÷ TP ÷ (bf16 FLOP/s × FLOP_EFFICIENCY)        (each sequence's token)
           + running × context × KV bytes per token per GPU ÷ (bandwidth × eff)  (attention reads the KV)

Every running sequence gains one token per step, so an engine finishes ``running ÷ (response × step_s)``
samples per second. What a request waits for in an admission queue (verl's router) is the work admitted
before it: ``(samples − what the servers admit at once) ÷ samples per second``. Pure: no I/O, no clock.
Deliberately rough (no prefill, no preemption, no stragglers): good for "minutes or hours?", not seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rollout_plugin.tuning.memory import kv_bytes_per_token, weight_bytes
from rollout_plugin.tuning.spec import HardwareSpec, ModelSpec

# Achieved fractions of the datasheet peaks in decode (what base_s and saturated decode imply for
# Llama-3.1-8B on one H100 in the h100_llama8b profile).
BW_EFFICIENCY = 0.77
FLOP_EFFICIENCY = 0.7


@dataclass(frozen=True)
class RolloutEstimate:
    """One step's generation on the rollout servers, if every response runs to ``response_tokens``."""

    samples: int  # requests the trainer sends per step (prompts × n)
    engines: int
    running: int  # sequences each engine decodes at once (its max_num_seqs)
    admitted: int  # samples the servers take at once (router caps × over-concurrency), the rest wait
    response_tokens: int
    step_s: float  # one decode step of one engine at ``running``
    samples_per_s: float  # all engines together
    rollout_s: float  # the whole step's generation
    wait_s: float  # the longest a request waits before any server admits it


def decode_step_s(model: ModelSpec, hw: HardwareSpec, *, tp: int, running: int, context: float) -> Optional[float]:
    """One decode step of an engine (TP group) with ``running`` sequences of ``context`` tokens; None: no figures."""
    if not hw.memory_bandwidth_gbs or not hw.bf16_tflops or running < 1:
        return None
    bandwidth = hw.memory_bandwidth_gbs * 1e9 * BW_EFFICIENCY
    flops = hw.bf16_tflops * 1e12 * FLOP_EFFICIENCY
    weights = weight_bytes(model) / tp / bandwidth
    compute = running * 2 * model.num_params / tp / flops
    kv = running * context * kv_bytes_per_token(model, tp) / bandwidth
    return weights + compute + kv


def rollout_estimate(model: ModelSpec, hw: HardwareSpec, *, engines: int, tp: int, running: int, samples: int,
                     admitted: int, prompt_tokens: int, response_tokens: int) -> Optional[RolloutEstimate]:
    """How long a step's ``samples`` take on ``engines`` servers, and the longest wait for admission."""
    if engines < 1 or samples < 1 or response_tokens < 1:
        return None
    running = max(1, min(running, -(-samples // engines)))  # fewer samples than slots: a smaller batch
    step = decode_step_s(model, hw, tp=tp, running=running, context=prompt_tokens + response_tokens / 2)
    if step is None:
        return None
    per_s = engines * running / (response_tokens * step)
    return RolloutEstimate(samples=samples, engines=engines, running=running, admitted=admitted,
                           response_tokens=response_tokens, step_s=step, samples_per_s=per_s,
                           rollout_s=samples / per_s, wait_s=max(0, samples - admitted) / per_s)
