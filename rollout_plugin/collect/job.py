"""The `collect` job: prompts in, k scored samples per prompt out, with a closing summary.

Checks every input before any engine starts (nothing is written for bad input), then streams
results from the pool into the verifier and the writer as they finish.
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
from rollout_plugin.config.schema import CollectConfig, SamplingConfig
from rollout_plugin.config.validate import validate_collect
from rollout_plugin.pool.pool import RolloutPool
from rollout_plugin.types import Request, Result, SamplingParams
from rollout_plugin.verify.runner import VerifierRunner, load_verifier

log = logging.getLogger(__name__)


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
        ]
        for e in self.engines:
            out.append(f"  {e.name}: share {e.share:.0%} | mean in-flight {e.mean_inflight:.1f} (final cap {e.cap}) | "
                       f"{e.samples} samples, {e.output_tokens} tokens"
                       + (f", {e.preemptions:g} preemptions" if e.preemptions is not None else ""))
        out.append(f"  output: {self.output} | timeline: {self.timeline} ({self.cap_changes} cap changes; "
                   f"`rollout-plugin plot timeline={self.timeline}`)")
        return out


def _rows(example: Example, result: Result, rewards: list[tuple[float | None, str | None]], k: int) -> list[dict]:
    rows = []
    for j, (sample, (reward, verr)) in enumerate(zip(result.samples, rewards)):
        row: dict[str, Any] = {
            "id": sample_id(example.id, j), "prompt_id": example.id, "sample": j, "k": k,
            "completion": sample.text, "reward": reward, "finish_reason": sample.finish_reason,
            "output_tokens": sample.output_tokens, "engine": result.engine, "latency_s": round(result.latency_s, 4),
        }
        if verr:
            row["verify_error"] = verr
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
    async with RolloutPool(cfg.engine, cfg.pool, controller) as pool, VerifierRunner(
            verifier, cfg.verify.executor, cfg.verify.workers) as runner:
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
                scored = await asyncio.gather(*(runner.score(s.text, {**example.fields, "id": example.id})
                                                for s in result.samples))
                writer.write_group(_rows(example, result, list(scored), k))
                rewards_all.extend(r for r, _ in scored if r is not None)
                verify_errors += sum(1 for _, e in scored if e)
                samples += len(result.samples)
                bar.update(len(result.samples))

            requests = [Request(ex.id, ex.prompt, n=k, sampling=sp, metadata=ex.fields) for ex in todo]
            async with asyncio.TaskGroup() as tg:
                async for result in pool.stream(requests):
                    tg.create_task(finish(result))  # verification overlaps generation
            generation_s = time.monotonic() - gen0
            bar.close()
            stats = pool.stats()
            cap_changes = pool.monitor.cap_changes if pool.monitor else 0
            preemptions = [m.preemptions_total for m in pool.monitor.latest] if pool.monitor else []
        finally:
            writer.close()
        startup = pool.startup_s

    total_tokens = stats.output_tokens
    engines = [
        EngineSummary(e.name, e.samples, e.samples / max(1, stats.samples), round(e.mean_inflight, 2), e.cap,
                      e.output_tokens, e.failed_calls, round(startup[i], 1) if i < len(startup) else None,
                      preemptions[i] if i < len(preemptions) else None)
        for i, e in enumerate(stats.engines)
    ]
    summary = CollectSummary(
        prompts=len(todo), skipped_done=len(examples) - len(todo), k=k, samples=samples, failed_prompts=failed,
        wall_s=round(time.monotonic() - wall0, 2), generation_s=round(generation_s, 2),
        samples_per_s=round(samples / max(generation_s, 1e-9), 2), output_tokens=total_tokens,
        output_tokens_per_s=round(total_tokens / max(generation_s, 1e-9), 1),
        reward_mean=round(sum(rewards_all) / len(rewards_all), 4) if rewards_all else None,
        verify_errors=verify_errors, cap_changes=cap_changes, engines=engines, output=str(writer.path),
        timeline=controller.timeline or "",
    )
    path = summary_path(writer.path)
    path.write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    return summary


