"""One simulated run: N simulated engines, one policy, one workload, on virtual time.

The ``pool`` policies are the real :class:`rollout_plugin.pool.api.pool.RolloutPool` (dispatcher,
routing, controller, monitor, failover) over :class:`SimEngineClient` s with ``clock=loop.time``;
only the transport is simulated. Baselines are :mod:`rollout_plugin.sim.baselines`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

from rollout_plugin.config.schema import (
    ControllerConfig,
    ControllerMode,
    EngineConfig,
    PoolConfig,
)
from rollout_plugin.errors import SimulationError
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.sim import rlrun
from rollout_plugin.sim.baselines import (
    Baseline,
    FixedBatch,
    LeastInflight,
    LeastLoaded,
    StaticSplit,
)
from rollout_plugin.sim.client import OUTPUT_KEY, PROMPT_KEY, SimEngineClient
from rollout_plugin.sim.config import FleetConfig, Policy, SimulateConfig
from rollout_plugin.sim.engine import SimEngine
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.sim.prefix_cache import PrefixCache, Reused
from rollout_plugin.sim.profile import EngineProfile
from rollout_plugin.sim.workload import Session, build_sessions, total_output_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    policy: str
    engines: int
    requests: int
    samples: int
    output_tokens: int  # generated and returned
    failed: int  # requests that ended in an error record
    makespan_s: float  # simulated
    tokens_per_s: float
    engine_busy: float  # mean share of the makespan an engine was stepping
    preemptions: int
    cap_changes: int
    wall_s: float  # real seconds the simulation took
    cpu_s: float = 0.0  # CPU seconds of this process (on a shared machine, wall time overstates)
    recomputed_tokens: float = 0.0  # prefilled again after preemptions (vLLM's recompute)
    # The run as a trainer sees it (rlrun: workload.steps; a single step trains everything it generated).
    steps: int = 1
    useful_tokens: int = 0  # output tokens of samples that reached a training step
    useful_tokens_per_s: float = 0.0  # over the run's simulated wall time (training included)
    wasted_tokens: int = 0  # generated and not trained: cut and generated again, dropped, unfinished at the end
    max_staleness_seen: int = 0  # weight versions between a trained sample's oldest tokens and the trainer's
    mean_trained_output_tokens: float = 0.0
    step_wait_s: tuple[float, ...] = ()  # per step: how long the trainer waited for its groups
    dropped_groups: int = 0  # finished, but too stale when a step could take them (pool.steps max_staleness)
    engine_calls: int = 0  # generate calls and /metrics scrapes sent: the HTTP a real client would pay for
    metrics_scrapes: int = 0
    # The engines' prefix caches (fleet.prefix_cache): prompt tokens of new requests looked up, found cached,
    # and found computed earlier on any engine; hit rate = hits / reusable (1.0: every reusable prefix was
    # found where it was cached; None: nothing was reusable).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_reusable: int = 0
    prefix_cache_hit_rate: Optional[float] = None
    prefix_cache_evictions: int = 0

    def row(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def parsed_metrics(enabled: bool = True):
    """Let the real monitor take the simulator's pre-parsed metrics instead of parsing 10³ texts a second.

    Only the parsing is skipped (the numbers are the ones the text says; ``test_sim`` checks it);
    every decision still runs through the monitor and the controller.
    """
    from rollout_plugin.pool.dispatch import monitor

    real = getattr(monitor, "parse_vllm_metrics", None)
    if not enabled or real is None:
        if enabled:
            log.warning("the monitor no longer imports parse_vllm_metrics: parsing simulated /metrics text (slower)")
        yield
        return
    monitor.parse_vllm_metrics = lambda text: getattr(text, "parsed", None) or real(text)
    try:
        yield
    finally:
        monitor.parse_vllm_metrics = real


def fleet_profile(profile: EngineProfile, fleet: FleetConfig) -> EngineProfile:
    """The profile with ``fleet.kv_tokens`` (when set) as its KV capacity."""
    if fleet.kv_tokens is None:
        return profile
    if fleet.kv_tokens < profile.block_size:
        raise SimulationError(f"fleet.kv_tokens={fleet.kv_tokens}: less than one KV block of the profile's "
                              f"{profile.block_size} tokens (use at least {profile.block_size}, or null for the "
                              f"profile's {profile.kv_tokens})")
    return replace(profile, kv_tokens=fleet.kv_tokens)


def build_fleet(n: int, profile: EngineProfile, fleet: FleetConfig) -> list[SimEngine]:
    """``n`` engines; with ``fleet.prefix_cache`` each has a prefix cache, all sharing one registry of the
    blocks computed anywhere (the hit rate's denominator)."""
    rng = random.Random(fleet.seed)
    slow = set(rng.sample(range(n), round(n * fleet.straggler_fraction)))
    profile = fleet_profile(profile, fleet)
    reused = Reused()
    return [SimEngine(f"engine{i}", profile, slowdown=fleet.straggler_slowdown if i in slow else 1.0,
                      prefix_cache=PrefixCache(profile.block_size, reused) if fleet.prefix_cache else None)
            for i in range(n)]


def cache_figures(engines: list[SimEngine]) -> dict:
    """The fleet's prefix-cache counters, summed, and the hit rate (RunResult's prefix_cache_* fields)."""
    caches = [e.cache for e in engines if e.cache is not None]
    hits, reusable = sum(c.hits for c in caches), sum(c.reusable for c in caches)
    return {"prefix_cache_queries": sum(c.queries for c in caches), "prefix_cache_hits": hits,
            "prefix_cache_reusable": reusable, "prefix_cache_hit_rate": hits / reusable if reusable else None,
            "prefix_cache_evictions": sum(c.evictions for c in caches)}


def _schedule_failures(engines: list[SimEngine], fleet: FleetConfig) -> None:
    count = round(len(engines) * fleet.failure_fraction)
    if not count:
        return
    victims = random.Random(fleet.seed + 1).sample(engines, count)
    loop = asyncio.get_running_loop()
    for e in victims:
        loop.call_at(fleet.failure_at_s, e.fail)


def pool_configs(cfg: SimulateConfig, profile: EngineProfile,
                 sessions: list[Session]) -> tuple[EngineConfig, PoolConfig, ControllerConfig]:
    """The pool's configs as a user would set them for this workload."""
    wl = cfg.workload
    engine_cfg = EngineConfig(max_model_len=cfg.fleet.max_model_len, max_num_seqs=profile.max_num_seqs)
    pool_cfg = replace(cfg.pool, k=wl.k if wl.turns <= 1 else 1)
    ctl = cfg.controller
    if ctl.expected_tokens is None:  # what a user sets from their workload: mean sample length
        turns = [r for s in sessions[:1000] for r in s.turns]
        mean = statistics.mean(r.metadata[PROMPT_KEY] / len(r.metadata[OUTPUT_KEY]) + statistics.mean(
            r.metadata[OUTPUT_KEY]) for r in turns)
        ctl = replace(ctl, expected_tokens=int(mean))
    return engine_cfg, pool_cfg, ctl


async def _drive_pool(policy: Policy, clients: list[SimEngineClient], sessions: list[Session], cfg: SimulateConfig,
                      profile: EngineProfile) -> tuple[int, int, int, float]:
    wl = cfg.workload
    engine_cfg, pool_cfg, ctl = pool_configs(cfg, profile, sessions)
    if policy == Policy.pool_fixed:
        ctl = replace(ctl, mode=ControllerMode.off)
    loop = asyncio.get_running_loop()
    async with RolloutPool(engine_cfg, pool_cfg, ctl, clients=clients, clock=loop.time) as pool:
        # Nobody scrapes the pool's own Prometheus registry here; updating 10³ engines' gauges every
        # simulated second would cost more than the policy it describes.
        if getattr(pool, "_dispatcher", None) is not None:
            pool._dispatcher.metrics = None
        if wl.turns <= 1:
            results = await asyncio.gather(*(pool.submit(s.turns[0]) for s in sessions))
            makespan = loop.time()
        else:
            async def session(s: Session):
                out = []
                for t, request in enumerate(s.turns):
                    if t:
                        await asyncio.sleep(wl.tool_latency_s)  # the tool call (simulated time)
                    result = await pool.submit(request)
                    out.append(result)
                    if not result.ok:
                        break
                return out

            results = [r for rs in await asyncio.gather(*(session(s) for s in sessions)) for r in rs]
            makespan = loop.time()
        cap_changes = pool.monitor.cap_changes if pool.monitor is not None else 0
    tokens = sum(r.output_tokens for r in results)
    failed = sum(1 for r in results if not r.ok)
    return tokens, failed, cap_changes, makespan


def _baseline(policy: Policy, clients: list[SimEngineClient], cfg: SimulateConfig) -> Baseline:
    b, lat = cfg.baselines, cfg.workload.tool_latency_s
    if policy == Policy.static:
        return StaticSplit(clients, b.retries, lat)
    if policy == Policy.verl:
        return LeastInflight(clients, b.retries, lat)
    if policy == Policy.least_loaded:
        return LeastLoaded(clients, b.retries, lat)
    if policy == Policy.distllm:
        return FixedBatch(clients, b.retries, lat, batch=b.distllm_batch * len(clients), timeout_s=b.distllm_timeout_s)
    raise SimulationError(f"policies: unknown policy {policy!r} (valid: {', '.join(p.value for p in Policy)})")


def simulate(policy: Policy, n_engines: int, profile: EngineProfile, cfg: SimulateConfig,
             sessions: list[Session] | None = None) -> RunResult:
    """Run one policy on ``n_engines`` simulated engines; returns simulated makespan and throughput
    (``workload.steps`` > 1: a whole RL run, :mod:`rollout_plugin.sim.rlrun`)."""
    wl = cfg.workload
    if wl.steps > 1:
        return simulate_run(policy, n_engines, profile, cfg)
    if sessions is None:
        prompts = wl.prompts_per_engine * n_engines if wl.prompts_per_engine else wl.prompts
        sessions = build_sessions(wl, prompts)
    expected = total_output_tokens(sessions)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    async def main() -> RunResult:
        engines = build_fleet(n_engines, profile, cfg.fleet)
        groups: dict[str, list[int]] = {}  # one bag per group for every client: a group's pieces go anywhere
        clients = [SimEngineClient(e, groups, stream_min_tokens=cfg.pool.stream_min_tokens) for e in engines]
        _schedule_failures(engines, cfg.fleet)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(cfg.horizon_s):
                if policy in (Policy.pool, Policy.pool_fixed):
                    tokens, failed, cap_changes, makespan = await _drive_pool(policy, clients, sessions, cfg, profile)
                else:
                    base = _baseline(policy, clients, cfg)
                    await base.run(sessions)
                    tokens, failed, cap_changes, makespan = base.output_tokens, base.failed, 0, loop.time()
        except TimeoutError:
            raise SimulationError(f"{policy.value} on {n_engines} engines did not finish within horizon_s="
                                  f"{cfg.horizon_s:g} simulated seconds (raise horizon_s)") from None
        if failed == 0 and tokens != expected:
            raise SimulationError(f"{policy.value}: generated {tokens} tokens, the workload has {expected}")
        busy = statistics.mean(min(1.0, e.busy_s / makespan) for e in engines) if makespan else 0.0
        samples = sum(len(r.metadata[OUTPUT_KEY]) for s in sessions for r in s.turns)
        return RunResult(policy.value, n_engines, sum(len(s.turns) for s in sessions), samples, tokens, failed,
                         makespan, tokens / makespan if makespan else 0.0, busy,
                         sum(e.preemptions for e in engines), cap_changes, 0.0,
                         recomputed_tokens=sum(e.recomputed_tokens for e in engines),
                         useful_tokens=tokens, useful_tokens_per_s=tokens / makespan if makespan else 0.0,
                         mean_trained_output_tokens=tokens / samples if samples else 0.0,
                         engine_calls=sum(c.calls for c in clients), metrics_scrapes=sum(c.scrapes for c in clients),
                         **cache_figures(engines))

    with parsed_metrics(not cfg.exact_metrics):
        result = run_virtual(main())
    return replace(result, wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0)


def simulate_run(policy: Policy, n_engines: int, profile: EngineProfile, cfg: SimulateConfig) -> RunResult:
    """A whole RL run of ``workload.steps`` steps (:mod:`rollout_plugin.sim.rlrun`)."""
    wl = cfg.workload
    prompts = wl.prompts_per_engine * n_engines if wl.prompts_per_engine else wl.prompts
    sessions = build_sessions(wl, prompts * wl.steps)  # the first `prompts` are the single step's
    steps = [sessions[i * prompts:(i + 1) * prompts] for i in range(wl.steps)]
    wall0, cpu0 = time.perf_counter(), time.process_time()

    async def main() -> RunResult:
        engines = build_fleet(n_engines, profile, cfg.fleet)
        groups: dict[str, list[int]] = {}
        clients = [SimEngineClient(e, groups, stream_min_tokens=cfg.pool.stream_min_tokens) for e in engines]
        _schedule_failures(engines, cfg.fleet)
        cap_changes = 0
        try:
            async with asyncio.timeout(cfg.horizon_s):
                if policy in (Policy.pool, Policy.pool_fixed):
                    fig, cap_changes = await rlrun.run_pool_steps(policy, clients, steps, cfg,
                                                                  *pool_configs(cfg, profile, sessions))
                else:
                    fig = await rlrun.run_sync_steps(_baseline(policy, clients, cfg), clients, steps, wl.train_s)
        except TimeoutError:
            raise SimulationError(f"{policy.value} on {n_engines} engines did not finish {wl.steps} steps within "
                                  f"horizon_s={cfg.horizon_s:g} simulated seconds (raise horizon_s)") from None
        generated = sum(e.generation_tokens for e in engines)
        wasted = rlrun.figures_check(fig, generated, policy.value)
        wall = fig.end_s
        return RunResult(policy.value, n_engines, len(sessions), sum(s.turns[0].n for s in sessions),
                         round(generated), fig.failed, wall, generated / wall if wall else 0.0,
                         rlrun.busy_share(engines, wall), sum(e.preemptions for e in engines), cap_changes, 0.0,
                         recomputed_tokens=sum(e.recomputed_tokens for e in engines), steps=wl.steps,
                         useful_tokens=fig.useful_tokens, useful_tokens_per_s=fig.useful_tokens / wall if wall else 0.0,
                         wasted_tokens=wasted, max_staleness_seen=fig.max_staleness_seen,
                         mean_trained_output_tokens=fig.useful_tokens / fig.trained_samples if fig.trained_samples
                         else 0.0, step_wait_s=fig.step_s, dropped_groups=fig.dropped_groups,
                         engine_calls=sum(c.calls for c in clients), metrics_scrapes=sum(c.scrapes for c in clients),
                         **cache_figures(engines))

    with parsed_metrics(not cfg.exact_metrics):
        result = run_virtual(main())
    return replace(result, wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0)
