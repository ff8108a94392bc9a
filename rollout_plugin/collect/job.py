"""The `collect` job: prompts in, k scored samples per prompt out, with a closing summary.

Checks every input before any engine starts (nothing is written for bad input), then streams
results from the pool into the verifier and the writer as they finish. With ``verify=deferred`` the
rows are written unscored (with their example and prompt) for ``rollout-plugin verify`` to score.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rollout_plugin.collect.dataset import Example, load_examples
from rollout_plugin.collect.output import RolloutWriter, sample_id, summary_path, timeline_path
from rollout_plugin.config.schema import CollectConfig, SamplingConfig, VerifyTiming
from rollout_plugin.config.validate import validate_collect
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.engines.prewarm import shared_prefix
from rollout_plugin.types import Request, Result, SamplingParams
from rollout_plugin.verify.cache import VerifyCache
from rollout_plugin.verify.runner import VerifierRunner, load_verifier

log = logging.getLogger(__name__)

# Verification "bounded the run" when it went on after the last result for more than this share of
# the generation time (the engines then sat idle while the job waited for rewards).
VERIFY_BOUND_FRACTION = 0.1


def sampling_params(cfg: SamplingConfig) -> SamplingParams:
    return SamplingParams(**{k: v for k, v in asdict(cfg).items()})


@dataclass
class EngineSummary:
    name: str
    samples: int
    share: float
    mean_inflight: float
    cap: int
    output_tokens: int
    failed_calls: int
    startup_s: float | None
    preemptions: float | None = None  # the engine's own counter (None: it exposes no metrics)
    warmup_s: float | None = None  # pre-warm requests before it got real traffic


@dataclass
class CollectSummary:
    prompts: int
    skipped_done: int
    k: int
    samples: int
    failed_prompts: int
    wall_s: float
    generation_s: float
    samples_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    reward_mean: float | None
    verify_errors: int
    cap_changes: int = 0
    verify_timing: str = "inline"
    verify_wait_s: float = 0.0  # from the last generated result to the last reward
    verify_busy_s: float = 0.0  # wall time with a verification running
    verify_cache_hits: int = 0
    bound_by: str = "generation"  # "verification" when the job waited on rewards after generation ended
    engines: list[EngineSummary] = field(default_factory=list)
    output: str = ""
    timeline: str = ""

    def lines(self) -> list[str]:
        reward = "n/a" if self.reward_mean is None else f"{self.reward_mean:.4f}"
        out = [
            f"collect: {self.prompts} prompts x k={self.k} -> {self.samples} samples in {self.generation_s:.1f}s "
            f"({self.failed_prompts} failed, {self.skipped_done} already done)",
            f"  samples/s {self.samples_per_s:.1f} | output tokens/s {self.output_tokens_per_s:.0f} | "
            f"reward mean {reward}",
            (f"  verification deferred: `rollout-plugin verify input={self.output}`"
             if self.verify_timing == "deferred" else
             f"  bound by {self.bound_by}: verification went on {self.verify_wait_s:.1f}s after the last result "
             f"(verifier busy {self.verify_busy_s:.1f}s, {self.verify_cache_hits} cache hits)"),
        ]
        for e in self.engines:
            out.append(f"  {e.name}: share {e.share:.0%} | mean in-flight {e.mean_inflight:.1f} (final cap {e.cap}) | "
                       f"{e.samples} samples, {e.output_tokens} tokens"
                       + (f", {e.preemptions:g} preemptions" if e.preemptions is not None else "")
                       + (f", warm-up {e.warmup_s:.1f}s" if e.warmup_s is not None else ""))
        out.append(f"  output: {self.output} | timeline: {self.timeline} ({self.cap_changes} cap changes; "
                   f"`rollout-plugin plot timeline={self.timeline}`)")
        return out


def bound_by(generation_s: float, verify_wait_s: float) -> str:
    return "verification" if verify_wait_s > VERIFY_BOUND_FRACTION * max(generation_s, 1e-9) else "generation"


def _rows(example: Example, result: Result, rewards: list[tuple[float | None, str | None]], k: int,
          deferred: bool = False) -> list[dict]:
    rows = []
    for j, (sample, (reward, verr)) in enumerate(zip(result.samples, rewards)):
        row: dict[str, Any] = {
            "id": sample_id(example.id, j), "prompt_id": example.id, "sample": j, "k": k,
            "completion": sample.text, "reward": reward, "finish_reason": sample.finish_reason,
            "output_tokens": sample.output_tokens, "engine": result.engine, "latency_s": round(result.latency_s, 4),
        }
        if verr:
            row["verify_error"] = verr
        if deferred:  # what `rollout-plugin verify` needs to score it later
            row.update(verified=False, example={**example.fields, "id": example.id}, prompt=example.prompt)
        rows.append(row)
    return rows


def _progress(cfg: CollectConfig, total: int):
    from tqdm import tqdm

    disable = cfg.progress == "off" or (cfg.progress == "auto" and not sys.stderr.isatty())
    return tqdm(total=total, unit="sample", disable=disable, dynamic_ncols=True, file=sys.stderr)


async def collect(cfg: CollectConfig) -> CollectSummary:
    """Run the job; raises :class:`RolloutPluginError` subclasses for bad input before anything starts."""
    validate_collect(cfg)
    examples = load_examples(cfg.input, cfg.limit)
    verifier = load_verifier(cfg.verify.verifier)
    deferred = cfg.verify.timing == VerifyTiming.deferred
    runner = VerifierRunner(verifier, cfg.verify.executor, cfg.verify.workers, mode=cfg.verify.mode,
                            cache=VerifyCache(cfg.verify.cache_size))  # checks executor vs verifier kind
    writer = RolloutWriter(cfg.output, k=cfg.pool.k, overwrite=cfg.overwrite, resume=cfg.resume)
    todo = [ex for ex in examples if ex.id not in writer.done]
    by_id = {ex.id: ex for ex in todo}
    sp = sampling_params(cfg.sampling)
    k = cfg.pool.k
    wall0 = time.monotonic()
    rewards_all: list[float] = []
    verify_errors = failed = samples = 0

    # The KV-based first cap needs a per-sample size: the sampling budget plus a prompt allowance.
    controller = replace(cfg.controller, timeline=cfg.controller.timeline or str(timeline_path(writer.path)),
                         expected_tokens=cfg.controller.expected_tokens or cfg.sampling.max_tokens + 128)
    warm = shared_prefix([ex.prompt for ex in todo]) if cfg.pool.prewarm.prefix else None
    async with RolloutPool(cfg.engine, cfg.pool, controller, warm_prompt=warm) as pool, runner:
        writer.open()
        try:
            pool.reset_stats()  # measure generation, not engine start-up
            gen0 = time.monotonic()
            bar = _progress(cfg, len(todo) * k)

            async def finish(result: Result) -> None:
                nonlocal verify_errors, failed, samples
                example = by_id[result.id]
                if not result.ok:
                    failed += 1
                    writer.write_error({"prompt_id": example.id, "error": result.error, "attempts": result.attempts})
                    return
                if deferred:
                    scored: list[tuple[float | None, str | None]] = [(None, None)] * len(result.samples)
                else:
                    fields = {**example.fields, "id": example.id}
                    scored = list(await asyncio.gather(*(runner.score(s.text, fields, example.prompt)
                                                         for s in result.samples)))
                writer.write_group(_rows(example, result, scored, k, deferred))
                rewards_all.extend(r for r, _ in scored if r is not None)
                verify_errors += sum(1 for _, e in scored if e)
                samples += len(result.samples)
                bar.update(len(result.samples))

            requests = [Request(ex.id, ex.prompt, n=k, sampling=sp, metadata=ex.fields) for ex in todo]
            async with asyncio.TaskGroup() as tg:
                async for result in pool.stream(requests):
                    tg.create_task(finish(result))  # verification overlaps generation
                gen_end = time.monotonic()
                stats = pool.stats()  # the engines' share of the work, without the verification tail
            generation_s = gen_end - gen0
            verify_wait_s = time.monotonic() - gen_end
            bar.close()
            cap_changes = pool.monitor.cap_changes if pool.monitor else 0
            preemptions = [m.preemptions_total for m in pool.monitor.latest] if pool.monitor else []
        finally:
            writer.close()
        startup = pool.startup_s
        warmup = [w.warm_s for w in pool.warmup]

    total_tokens = stats.output_tokens
    engines = [
        EngineSummary(e.name, e.samples, e.samples / max(1, stats.samples), round(e.mean_inflight, 2), e.cap,
                      e.output_tokens, e.failed_calls, round(startup[i], 1) if i < len(startup) else None,
                      preemptions[i] if i < len(preemptions) else None,
                      round(warmup[i], 2) if i < len(warmup) else None)
        for i, e in enumerate(stats.engines)
    ]
    summary = CollectSummary(
        prompts=len(todo), skipped_done=len(examples) - len(todo), k=k, samples=samples, failed_prompts=failed,
        wall_s=round(time.monotonic() - wall0, 2), generation_s=round(generation_s, 2),
        samples_per_s=round(samples / max(generation_s, 1e-9), 2), output_tokens=total_tokens,
        output_tokens_per_s=round(total_tokens / max(generation_s, 1e-9), 1),
        reward_mean=round(sum(rewards_all) / len(rewards_all), 4) if rewards_all else None,
        verify_errors=verify_errors, cap_changes=cap_changes, verify_timing=cfg.verify.timing.value,
        verify_wait_s=round(verify_wait_s, 2), verify_busy_s=round(runner.stats.busy_s, 2),
        verify_cache_hits=runner.stats.cache_hits, bound_by=bound_by(generation_s, verify_wait_s),
        engines=engines, output=str(writer.path),
        timeline=controller.timeline or "",
    )
    path = summary_path(writer.path)
    path.write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    return summary


