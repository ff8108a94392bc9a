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
    log_prob_token_budget: int = 0  # tokens a forward-only pass fits per GPU (memory model)


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
               critic_token_budget: Optional[int] = None, forward_token_budget: Optional[int] = None,
               critic_forward_token_budget: Optional[int] = None) -> VerlBatch:
    """Per-GPU verl values; call :func:`check_divisibility` first (this assumes the batch divides).

    ``forward_token_budget``: tokens a forward-only pass fits per GPU (memory.forward_token_budget); the
    log-prob micro-batches and token budgets are sized by it, not by doubling the training ones (which
    are already sized to fill the GPU). Unset: the training budget.
    """
    mini = w.ppo_mini_batch_size * w.n // (world_size // sp)
    seq_per_gpu = -(-w.max_seq_len // sp)
    micro = _largest_divisor_fitting(mini, seq_per_gpu, token_budget)
    forward = token_budget if forward_token_budget is None else forward_token_budget
    critic = {}
    if critic_token_budget is not None:
        c_micro = max(micro, _largest_divisor_fitting(mini, seq_per_gpu, critic_token_budget))
        c_forward = critic_token_budget if critic_forward_token_budget is None else critic_forward_token_budget
        critic = dict(critic_micro_batch_per_gpu=c_micro,
                      critic_forward_micro_batch_per_gpu=log_prob_micro(c_micro, c_forward, seq_per_gpu),
                      critic_ppo_max_token_len_per_gpu=max(token_len(token_budget, seq_per_gpu),
                                                           token_len(critic_token_budget, seq_per_gpu)),
                      critic_forward_max_token_len_per_gpu=token_len(c_forward, seq_per_gpu))
    return VerlBatch(world_size=world_size, ulysses_sp=sp, mini_batch_per_gpu=mini, micro_batch_per_gpu=micro,
                     log_prob_micro_batch_per_gpu=log_prob_micro(micro, forward, seq_per_gpu),
                     ppo_max_token_len_per_gpu=token_len(token_budget, seq_per_gpu),
                     log_prob_max_token_len_per_gpu=token_len(forward, seq_per_gpu),
                     log_prob_token_budget=forward, **critic)


def token_len(budget: int, seq_per_gpu: int) -> int:
    """A dynamic-batch token budget: what fits, in whole K, capped; never below 2 × (prompt + response) ÷ sp."""
    # The guide's floor is 2 × (prompt + response) per micro-batch; with SP each GPU holds 1/sp of it.
    return max(2 * seq_per_gpu, min(MAX_TOKEN_LEN_CAP, budget) // 1024 * 1024)


def log_prob_micro(train_micro: int, forward_budget: int, seq_per_gpu: int) -> int:
    """Forward-only micro-batch: twice the training one (no backward), as far as the forward budget holds it."""
    return max(1, min(2 * train_micro, forward_budget // max(1, seq_per_gpu)))


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
