"""Trainer batch math: global (algorithmic) batch sizes into per-GPU (performance) values.

verl normalizes in each worker: ``ppo_mini_batch_size × n ÷ (world_size ÷ ulysses_sp)`` samples per
GPU, and micro-batches must divide that. TRL counts completions: ``generation_batch_size =
per_device_train_batch_size × world_size × steps_per_generation``, divisible by ``num_generations``.
Everything here is arithmetic on plain ints; the planner decides the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from rollout_plugin.config.validate import Problems
from rollout_plugin.tuning.spec import WorkloadSpec

# A larger dynamic-batch token budget gains little and makes one micro-batch's OOM more likely.
MAX_TOKEN_LEN_CAP = 65536


@dataclass(frozen=True)
class VerlBatch:
    world_size: int  # training GPUs
    ulysses_sp: int
    mini_batch_per_gpu: int  # samples, after normalization
    micro_batch_per_gpu: int  # training (fwd+bwd)
    log_prob_micro_batch_per_gpu: int  # forward only: ref and rollout log-probs
    ppo_max_token_len_per_gpu: int
    log_prob_max_token_len_per_gpu: int
    critic_micro_batch_per_gpu: Optional[int] = None
    critic_forward_micro_batch_per_gpu: Optional[int] = None
    critic_ppo_max_token_len_per_gpu: Optional[int] = None
    critic_forward_max_token_len_per_gpu: Optional[int] = None


@dataclass(frozen=True)
class TrlBatch:
    world_size: int
    num_generations: int
    per_device_train_batch_size: int  # completions per GPU per micro-step
    gradient_accumulation_steps: int
    generation_batch_size: int  # completions per generation round (all GPUs)
    steps_per_generation: int


def check_divisibility(w: WorkloadSpec, world_size: int, sp: int, p: Problems) -> None:
    """The batch rules both trainers enforce, as problems naming the key and the nearest valid value."""
    if w.ppo_mini_batch_size > w.train_batch_size:
        p.add("workload.ppo_mini_batch_size", w.ppo_mini_batch_size,
              f"exceeds workload.train_batch_size ({w.train_batch_size}): one mini-batch is at most one batch",
              w.train_batch_size)
    elif w.train_batch_size % w.ppo_mini_batch_size:
        p.add("workload.ppo_mini_batch_size", w.ppo_mini_batch_size,
              f"must divide workload.train_batch_size ({w.train_batch_size}) so every step has whole mini-batches",
              _nearest(w.ppo_mini_batch_size, _divisors(w.train_batch_size)))
    # verl: train_batch_size × n must split evenly over all training GPUs.
    step = world_size // math.gcd(w.n, world_size)
    if (w.train_batch_size * w.n) % world_size:
        p.add("workload.train_batch_size", w.train_batch_size,
              f"× n ({w.n}) = {w.train_batch_size * w.n} samples do not divide over {world_size} training GPUs",
              " or ".join(str(v) for v in _nearest_multiples(w.train_batch_size, step)))
    # verl: ppo_mini_batch_size × n must split evenly over the data-parallel ranks (world ÷ sp).
    dp = world_size // sp
    step = dp // math.gcd(w.n, dp)
    if (w.ppo_mini_batch_size * w.n) % dp and w.ppo_mini_batch_size <= w.train_batch_size:
        p.add("workload.ppo_mini_batch_size", w.ppo_mini_batch_size,
              f"× n ({w.n}) = {w.ppo_mini_batch_size * w.n} samples do not divide over {dp} data-parallel ranks "
              f"({world_size} GPUs ÷ ulysses_sp {sp})",
              " or ".join(str(v) for v in _nearest_multiples(w.ppo_mini_batch_size, step)))


def verl_batch(w: WorkloadSpec, *, world_size: int, sp: int, token_budget: int,
               critic_token_budget: Optional[int] = None) -> VerlBatch:
    """Per-GPU verl values; call :func:`check_divisibility` first (this assumes the batch divides)."""
    mini = w.ppo_mini_batch_size * w.n // (world_size // sp)
    seq_per_gpu = -(-w.max_seq_len // sp)
    micro = _largest_divisor_fitting(mini, seq_per_gpu, token_budget)
    # The guide's floor is 2 × (prompt + response) per micro-batch; with SP each GPU holds 1/sp of it.
    floor = 2 * seq_per_gpu
    max_tokens = max(floor, min(MAX_TOKEN_LEN_CAP, token_budget) // 1024 * 1024)
    critic = {}
    if critic_token_budget is not None:
        c_micro = max(micro, _largest_divisor_fitting(mini, seq_per_gpu, critic_token_budget))
        c_tokens = max(max_tokens, min(MAX_TOKEN_LEN_CAP, critic_token_budget) // 1024 * 1024)
        critic = dict(critic_micro_batch_per_gpu=c_micro, critic_forward_micro_batch_per_gpu=2 * c_micro,
                      critic_ppo_max_token_len_per_gpu=c_tokens, critic_forward_max_token_len_per_gpu=2 * c_tokens)
    return VerlBatch(world_size=world_size, ulysses_sp=sp, mini_batch_per_gpu=mini, micro_batch_per_gpu=micro,
                     log_prob_micro_batch_per_gpu=2 * micro, ppo_max_token_len_per_gpu=max_tokens,
                     log_prob_max_token_len_per_gpu=2 * max_tokens, **critic)


def trl_batch(w: WorkloadSpec, *, world_size: int, token_budget: int) -> TrlBatch:
    """TRL's GRPO counts completions; one optimizer step sees ``ppo_mini_batch_size × n`` of them.

    TRL has no sequence parallelism, so a whole sequence sits on one GPU.
    """
    mini_per_gpu = w.ppo_mini_batch_size * w.n // world_size
    per_device = _largest_divisor_fitting(mini_per_gpu, w.max_seq_len, token_budget)
    accum = mini_per_gpu // per_device
    generation = w.train_batch_size * w.n
    return TrlBatch(world_size=world_size, num_generations=w.n, per_device_train_batch_size=per_device,
                    gradient_accumulation_steps=accum, generation_batch_size=generation,
                    steps_per_generation=generation // (per_device * world_size))


def _largest_divisor_fitting(mini: int, seq_tokens: int, token_budget: int) -> int:
    fits = max(1, token_budget // max(1, seq_tokens))
    return max(d for d in _divisors(mini) if d <= fits or d == 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else [1]


def _nearest(value: int, candidates: list[int]) -> int:
    return min(candidates, key=lambda c: (abs(c - value), c))


def _nearest_multiples(value: int, step: int) -> list[int]:
    """The multiples of ``step`` just below and above ``value`` (one if value is below the first)."""
    below, above = value // step * step, (value // step + 1) * step
    return [v for v in (below, above) if v > 0]
