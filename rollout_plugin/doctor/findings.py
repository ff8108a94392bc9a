"""What to change after a run: facts from its summary and timeline in, findings with overrides out.

Pure: plain dicts (the files' JSON) become :class:`RunFacts`; :func:`diagnose` turns facts into
:class:`Finding` objects, each with the numbers that show it and the exact override to try, in the
seed guides' terms (Xtuner's per-engine cap and over-concurrency ratio, veRL's
gpu_memory_utilization and max_num_seqs, distllm's low-utilization batches, NeMo Gym's verifier
placement). Thresholds are named constants, so a finding can be traced to the rule that made it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# A timeline sample counts when the engine had work or work was waiting for it.
AT_CAP_FRACTION = 0.9  # in-flight at or above this share of the cap: the cap binds
QUEUED_SHARE = 0.5  # work waited in the pool for at least this share of the active samples
UNDERFED_FRACTION = 0.7  # engines below this share of their cap while work waited: a global limit binds
LOW_UTILIZATION = 0.5  # running below this share of the cap with nothing queued: batches do not fill
QUEUE_EMPTY_SHARE = 0.2  # "nothing queued": work waited in at most this share of the samples
KV_FULL = 0.9  # p95 KV usage above this: the cap sits at the memory limit
KV_ROOM = 0.5  # p95 KV usage below this: memory is not what limits a higher cap
KV_EMPTY = 0.3  # p95 KV usage below this while vLLM queues requests: max_num_seqs binds
VERIFY_BOUND_FRACTION = 0.1  # verification outlasting generation by this share of it
STRAGGLER_FRACTION = 0.6  # an engine below this share of the others' median tokens/s
RAISE = 2  # suggested raises double; cuts take 70 %
CUT = 0.7


@dataclass(frozen=True)
class EngineFacts:
    name: str
    cap: int  # final in-flight cap (samples)
    samples: int = 0
    output_tokens: int = 0
    active_samples: int = 0  # timeline samples with work in flight or queued
    at_cap_share: float = 0.0
    queued_share: float = 0.0
    inflight_mean: float = 0.0
    running_mean: float | None = None
    running_max: int | None = None
    waiting_mean: float | None = None
    kv_p95: float | None = None
    preemptions: float = 0.0  # during the run
    tokens_per_s: float | None = None  # median over the run


@dataclass(frozen=True)
class RunFacts:
    engines: tuple[EngineFacts, ...]
    k: int = 1
    samples: int = 0
    generation_s: float = 0.0
    verify_wait_s: float = 0.0
    verify_timing: str = "inline"
    source: str = "run"  # "run" (summary + timeline) or "live" (one /metrics snapshot)


@dataclass(frozen=True)
class Finding:
    code: str
    engine: str | None  # None: the whole run
    title: str
    evidence: str
    override: str

    def lines(self) -> list[str]:
        where = f" [{self.engine}]" if self.engine else ""
        return [f"- {self.code}{where}: {self.title}", f"    evidence: {self.evidence}", f"    try: {self.override}"]


def _share(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def engine_facts(name: str, summary_engine: dict[str, Any], samples: Sequence[dict[str, Any]]) -> EngineFacts:
    """One engine's facts from its summary entry and its timeline samples."""
    active = [s for s in samples if (s.get("inflight") or 0) > 0 or (s.get("queued") or 0) > 0]
    cap = int(summary_engine.get("cap") or (active[-1].get("cap") if active else 0) or 0)
    running = [s["running"] for s in active if s.get("running") is not None]
    waiting = [s["waiting"] for s in active if s.get("waiting") is not None]
    kv = [s["kv_usage"] for s in active if s.get("kv_usage") is not None]
    tps = [s["tokens_per_s"] for s in active if s.get("tokens_per_s")]
    pre = [s["preemptions"] for s in samples if s.get("preemptions") is not None]
    return EngineFacts(
        name=name, cap=cap, samples=int(summary_engine.get("samples") or 0),
        output_tokens=int(summary_engine.get("output_tokens") or 0), active_samples=len(active),
        at_cap_share=_share((s.get("inflight") or 0) >= AT_CAP_FRACTION * max(1, s.get("cap") or cap)
                            for s in active),
        queued_share=_share((s.get("queued") or 0) > 0 for s in active),
        inflight_mean=statistics.fmean(s.get("inflight") or 0 for s in active) if active else 0.0,
        running_mean=statistics.fmean(running) if running else None, running_max=max(running) if running else None,
        waiting_mean=statistics.fmean(waiting) if waiting else None, kv_p95=_p95(kv),
        preemptions=(max(pre) - min(pre)) if pre else float(summary_engine.get("preemptions") or 0.0),
        tokens_per_s=statistics.median(tps) if tps else None)


def run_facts(summary: dict[str, Any], timeline: Sequence[dict[str, Any]] = ()) -> RunFacts:
    """Facts of a collect run from ``<output>.summary.json`` and ``<output>.timeline.jsonl`` (parsed)."""
    by_engine: dict[str, list[dict[str, Any]]] = {}
    for record in timeline:
        if record.get("kind") == "sample":
            by_engine.setdefault(record["engine"], []).append(record)
    engines = summary.get("engines") or [{"name": n} for n in by_engine]
    return RunFacts(
        engines=tuple(engine_facts(e["name"], e, by_engine.get(e["name"], [])) for e in engines),
        k=int(summary.get("k") or 1), samples=int(summary.get("samples") or 0),
        generation_s=float(summary.get("generation_s") or 0.0),
        verify_wait_s=float(summary.get("verify_wait_s") or 0.0),
        verify_timing=str(summary.get("verify_timing") or "inline"))


def live_facts(snapshots: dict[str, dict[str, Any]]) -> RunFacts:
    """Facts from one /metrics snapshot per engine (``running``, ``waiting``, ``kv_usage``, ``preemptions``)."""
    engines = []
    for name, m in snapshots.items():
        running = m.get("running")
        engines.append(EngineFacts(
            name=name, cap=0, active_samples=1, running_mean=running, running_max=running,
            waiting_mean=m.get("waiting"), kv_p95=m.get("kv_usage"), preemptions=m.get("preemptions") or 0.0))
    return RunFacts(engines=tuple(engines), source="live")


# -- rules ----------------------------------------------------------------------------------------
def _underfed(run: RunFacts) -> list[Finding]:
    out = []
    active = [e for e in run.engines if e.active_samples and e.cap]
    waited = [e for e in active if e.queued_share >= QUEUED_SHARE]
    at_cap = [e for e in waited if e.at_cap_share >= QUEUED_SHARE and (e.kv_p95 is None or e.kv_p95 < KV_ROOM)
              and not e.preemptions]
    for e in at_cap:
        kv = "n/a" if e.kv_p95 is None else f"{e.kv_p95:.0%}"
        out.append(Finding(
            "underfed-cap", e.name, "engine held at its per-engine cap while work waited in the pool",
            f"in flight at ≥{AT_CAP_FRACTION:.0%} of cap {e.cap} in {e.at_cap_share:.0%} of the run, work queued "
            f"in {e.queued_share:.0%}, KV p95 {kv}, no preemptions",
            f"pool.per_engine={max(e.cap * RAISE, run.k)} (Xtuner's rollout_max_batch_size_per_instance; "
            f"adaptive: also controller.max_cap={max(e.cap * RAISE * 2, run.k)})"))
    low = [e for e in waited if e not in at_cap and e.inflight_mean < UNDERFED_FRACTION * e.cap]
    if low and len(low) == len([e for e in active if e not in at_cap]):
        caps = sum(e.cap for e in active)
        groups = max(1, math.ceil(caps / max(1, run.k)))
        mean = ", ".join(f"{e.name} {e.inflight_mean:.1f}/{e.cap}" for e in low)
        out.append(Finding(
            "underfed-global", None, "engines underfed: the pool's global limit held work back",
            f"mean in flight {mean} (in-flight/cap) while work waited in the pool "
            f"{statistics.fmean(e.queued_share for e in low):.0%} of the time",
            f"pool.max_concurrent={groups} (groups of k={run.k}; fills every engine's cap) "
            f"or pool.over_concurrency_ratio=1.5"))
    return out


def _batches_not_filling(run: RunFacts) -> list[Finding]:
    out = []
    for e in run.engines:
        if not e.active_samples or not e.cap or e.running_mean is None or e.queued_share > QUEUE_EMPTY_SHARE:
            continue
        if e.running_mean < LOW_UTILIZATION * e.cap:
            out.append(Finding(
                "batch-not-filling", e.name, "batches not filling: the job gave the engine too little work at once",
                f"mean running batch {e.running_mean:.1f} of cap {e.cap} with the pool queue empty "
                f"{1 - e.queued_share:.0%} of the time (distllm's low-utilization case)",
                f"more prompts in flight per step (a larger batch / pool.k), or fewer engines: "
                f"pool.engines={max(1, len(run.engines) // 2)}"))
    return out


def _kv(run: RunFacts) -> list[Finding]:
    out = []
    for e in run.engines:
        if e.preemptions > 0 or (e.kv_p95 is not None and e.kv_p95 >= KV_FULL):
            kv = "n/a" if e.kv_p95 is None else f"{e.kv_p95:.0%}"
            cut = max(run.k, int(max(e.cap, e.running_max or 0) * CUT)) if (e.cap or e.running_max) else None
            lower = f"pool.per_engine={cut}" if cut else "a lower pool.per_engine"
            out.append(Finding(
                "kv-pressure", e.name, "KV cache near full: requests are preempted and recomputed",
                f"{e.preemptions:g} preemptions, KV p95 {kv} (cap {e.cap or 'n/a'})",
                f"{lower} (or controller=adaptive, which cuts above controller.kv_high), or give the engine more "
                f"KV: engine.gpu_memory_utilization=0.95 (GPU) / engine.cpu_kvcache_gb=<more> (CPU)"))
        elif (e.kv_p95 is not None and e.kv_p95 < KV_EMPTY and e.waiting_mean and e.waiting_mean >= 1
              and e.running_max):
            out.append(Finding(
                "kv-idle", e.name, "KV cache mostly empty while vLLM queues requests: max_num_seqs binds",
                f"KV p95 {e.kv_p95:.0%}, mean {e.waiting_mean:.1f} requests waiting inside vLLM, running at most "
                f"{e.running_max}",
                f"engine.max_num_seqs={e.running_max * RAISE}"))
    return out


def _verification(run: RunFacts) -> list[Finding]:
    if run.verify_timing == "deferred" or run.generation_s <= 0:
        return []
    if run.verify_wait_s <= VERIFY_BOUND_FRACTION * run.generation_s:
        return []
    return [Finding(
        "verify-bound", None, "verification-bound: the job waited on rewards after generation ended",
        f"verification went on {run.verify_wait_s:.1f}s after the last result; generation took "
        f"{run.generation_s:.1f}s",
        "verify=deferred (score later: rollout-plugin verify input=… parallelism=50), or parallelise: "
        "verify.workers=<2× or more> (verify.executor=process for CPU-bound, async for remote verifiers)")]


def _straggler(run: RunFacts) -> list[Finding]:
    rated = [e for e in run.engines if e.tokens_per_s]
    if len(rated) < 2:
        return []
    out = []
    for e in rated:
        others = statistics.median(o.tokens_per_s for o in rated if o is not e)  # type: ignore[misc]
        if e.tokens_per_s < STRAGGLER_FRACTION * others:  # type: ignore[operator]
            out.append(Finding(
                "straggler", e.name, "one engine is slow (a straggler)",
                f"{e.tokens_per_s:.0f} output tokens/s against the others' median {others:.0f}",
                "controller=adaptive (its cap follows its own throughput), and check its placement "
                "(engine.cpu_bind / its GPU); attached engines: leave it out of engine.urls"))
    return out


RULES = (_underfed, _batches_not_filling, _kv, _verification, _straggler)


def diagnose(run: RunFacts) -> list[Finding]:
    """Every finding, in rule order; an empty list means nothing to change."""
    return [f for rule in RULES for f in rule(run)]
