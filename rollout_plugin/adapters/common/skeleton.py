"""A worked skeleton of a new trainer adapter (OpenRLHF-shaped), built from :mod:`rollout_plugin.adapters.common`.

config -> pool -> generate a step's groups -> the trainer trains -> push its weights -> next step. Single
process; ``docs/adapters.md`` says what changes for several ranks. ``tests/test_adapter_skeleton.py`` runs it
against the real CPU engine, so this code cannot drift from the pool's API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout_plugin.adapters.common import (
    PREFIX,
    FolderPublisher,
    PoolLogMetrics,
    SyncRecord,
    checked,
    group_requests,
    named_weights,
    render_prompts,
    unpack,
)
from rollout_plugin.config.schema import EngineConfig, PoolConfig
from rollout_plugin.pool import SyncRolloutPool
from rollout_plugin.types import SamplingParams

__all__ = ["Experience", "PoolRollouts", "SkeletonConfig", "train"]


@dataclass(frozen=True)
class SkeletonConfig:
    """What the trainer's own config would carry (OpenRLHF names where it has one)."""

    engine: EngineConfig  # the engines: launched (model, pool.engines) or attached (urls)
    weights_dir: str  # a folder every engine can read: each push writes safetensors there
    pool: PoolConfig = field(default_factory=PoolConfig)
    n_samples_per_prompt: int = 4  # a GRPO group: one request with n samples
    rollout_batch_size: int = 2  # prompts (groups) per step
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16, logprobs=True))
    update_mode: str = "drain"  # how in-flight work crosses a push: drain, restart, keep, continue
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": False}


@dataclass(frozen=True)
class Experience:
    """One completion as the trainer trains on it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # per sampled token, from the engine (the importance-sampling correction's "old")
    weight_version: int  # the oldest weights any of its tokens came from
    reward: float


class PoolRollouts:
    """The adapter: owns the pool; prompts in, scored experience out; the trainer's weights out to the engines."""

    def __init__(self, cfg: SkeletonConfig, tokenizer: Any,
                 reward_fn: Callable[[list[int], list[int]], float]):
        self.cfg, self.tokenizer, self.reward_fn = cfg, tokenizer, reward_fn
        self.pool: SyncRolloutPool | None = None
        self._metrics = PoolLogMetrics()

    def __enter__(self) -> PoolRollouts:
        self.pool = SyncRolloutPool(self.cfg.engine, self.cfg.pool).__enter__()  # engines up, or it raises
        self.publisher = FolderPublisher(self.pool, Path(self.cfg.weights_dir), mode=self.cfg.update_mode)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.__exit__(*exc_info)

    def generate(self, prompts: Sequence[Any]) -> list[Experience]:
        """One step's groups: every prompt ``n_samples_per_prompt`` times, each completion scored."""
        k = self.cfg.n_samples_per_prompt
        ids = render_prompts(self.tokenizer, prompts, self.cfg.chat_template_kwargs)
        results = checked(self.pool.generate(group_requests(ids, k, self.cfg.sampling, "skeleton")))
        completion_ids, logprobs, versions, _spans = unpack(results)  # per completion, group order
        prompt_ids = [p for p in ids for _ in range(k)]
        return [Experience(p, c, lp, v, self.reward_fn(p, c))
                for p, c, lp, v in zip(prompt_ids, completion_ids, logprobs, versions)]

    def push_weights(self, model: Any, version: int) -> SyncRecord:
        """The trainer's weights into every engine; results from now on carry ``version``."""
        return self.publisher.publish(named_weights(model), version)

    def log_metrics(self) -> dict[str, float]:
        """The pool's state for the trainer's logger (``rollout_pool/*``, tokens/s since the last call)."""
        return {PREFIX + k: v for k, v in self._metrics.snapshot(self.pool).items()}


def train(rollouts: PoolRollouts, model: Any, prompts: Sequence[Any], steps: int,
          train_step: Callable[[Any, list[Experience]], None]) -> list[dict[str, float]]:
    """The trainer's loop: generate, train, push, log. Returns one log row per step."""
    size = rollouts.cfg.rollout_batch_size
    logs = []
    for step in range(steps):
        batch = [prompts[(step * size + i) % len(prompts)] for i in range(size)]
        experience = rollouts.generate(batch)
        train_step(model, experience)
        record = rollouts.push_weights(model, version=step + 1)
        logs.append({"step": float(step), "reward": sum(e.reward for e in experience) / len(experience),
                     "weight_sync_s": record.total_s, **rollouts.log_metrics()})
    return logs
