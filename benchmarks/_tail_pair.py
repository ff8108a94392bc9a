"""Issue 22's real CPU pair (``tail.py pair`` / ``tail.py hetero``): one GRPO step, every contender on the pool's
own transport, interleaved rounds.

Every contender sends through :class:`~rollout_plugin.pool.transport.http.HttpEngineClient` (aiohttp), built as the pool
builds its own (``RolloutPool._http_client``, the pool's default timeouts), so the client's CPU per call is the
same for all: on httpx a static split lost 3–4 s of CPU per step to its client and looked 1.7× slower than it is.
The baselines are the simulator's own (``rollout_plugin/sim/baselines.py``), run on these real clients:

  static    TRL server mode / static DP: group i's requests all go to engine i mod 2, everything at once;
  verl      verl's router: least in flight by request count (ties to engine0), no cap, everything at once;
  pool      RolloutPool with its defaults (adaptive controller, packing, group mode auto);
  pool_off  the same with ``controller.mode=off`` (the preset caps).

``--unit sample`` (default, the issue's workload): each sample is its own ``n=1`` request (64 × 8 = 512), the way
verl's agent loop asks; the pool gets the same 512 requests and packs them as it will. ``--unit group``: one ``n=k``
request per group for every contender (what ``tail.py hetero`` measured before issue 22).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

from _tail_util import (
    KEY, MAX_LOAD, MAX_MODEL_LEN, GroupSpec, Meter, Rounds, check_load, header, launch_engine, order, requests_of,
    sample_requests, skewed_specs)

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig
from rollout_plugin.pool.transport.http import HttpEngineClient
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.sim.baselines import Baseline, LeastInflight, StaticSplit
from rollout_plugin.sim.workload import Session
from rollout_plugin.types import Request, Result

__all__ = ["CONTENDERS", "pair_step"]

CONTENDERS = ("static", "verl", "pool", "pool_off")


class StaticByGroup(StaticSplit):
    """Static DP by group: every request of group i goes to engine i mod N (its samples share a prefix cache)."""

    async def session(self, index: int, session: Session) -> None:
        await super().session(session.group, session)


def pool_clients(urls: Sequence[str], model: str) -> list[HttpEngineClient]:
    """The transport the pool opens for itself (``RolloutPool._http_client``), with the pool's default timeouts."""
    t = PoolConfig().timeouts
    return [HttpEngineClient(f"engine{i}", url, api_key=KEY, model=model, max_connections=0, connect_s=t.connect_s,
                             request_s=t.request_s, admission_s=t.admission_s, health_s=t.health_s)
            for i, url in enumerate(urls)]


def step_requests(specs: Sequence[GroupSpec], k: int, unit: str, label: str) -> list[tuple[int, Request]]:
    """(group, request) pairs of one step: ``k`` ``n=1`` requests per group, or one ``n=k`` request."""
    if unit == "sample":
        return [(i // k, r) for i, r in enumerate(sample_requests(specs, k, label))]
    return list(enumerate(requests_of(specs, k, label)))


async def run_baseline(cls: type[Baseline], clients: list[HttpEngineClient], reqs: list[tuple[int, Request]],
                       label: str) -> dict[str, float]:
    base = cls(clients, retries=0, tool_latency_s=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    await base.run([Session(g, (r,)) for g, r in reqs])
    span, cpu = time.perf_counter() - t0, time.process_time() - c0
    if base.failed:
        raise SystemExit(f"{label}: {base.failed} request(s) failed, first: {base.errors}")
    return {"makespan s": span, "tokens": base.output_tokens, "client cpu s": cpu}


async def run_pool(pool: RolloutPool, reqs: list[tuple[int, Request]], label: str) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    results: list[Result] = await pool.generate([r for _, r in reqs])
    span, cpu = time.perf_counter() - t0, time.process_time() - c0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{label}: {len(bad)} request(s) failed, e.g. {bad[0].id}: {bad[0].error}")
    return {"makespan s": span, "tokens": sum(r.output_tokens for r in results), "client cpu s": cpu}


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def pair_step(args, starved: bool) -> None:
    load_at_start = check_load(args.allow_load or args.quick)
    extra = ["--num-gpu-blocks-override", str(max(1, args.kv_tokens // 128))] if starved else []  # 128-token CPU blocks
    dev = not args.plain_engines  # an RL server runs in dev mode (weight updates); there /abort_requests exists
    procs = [launch_engine(0, 2, args.model_dir, dev_mode=dev),
             launch_engine(1, 2, args.model_dir, extra=extra, dev_mode=dev)]
    rounds = Rounds(args.rounds)
    try:
        for p in procs:
            await p.wait_ready()
        urls = [p.url for p in procs]
        meter = Meter(urls, [KEY, KEY])
        clients = pool_clients(urls, args.model_dir)
        kv = [m.kv_tokens for m in await meter.all()]
        print(f"KV tokens per engine (from /metrics): {kv}", flush=True)
        specs = skewed_specs(args.groups, seed=19, mean=args.mean, sigma=args.sigma)
        total = sum(s.length for s in specs) * args.k
        engine = EngineConfig(urls=urls, api_key=KEY, served_model_name=args.model_dir, max_model_len=MAX_MODEL_LEN)
        ctls = {"pool": ControllerConfig(expected_tokens=args.expected_tokens),
                "pool_off": ControllerConfig(mode="off", expected_tokens=args.expected_tokens)}
        kept = {n: await RolloutPool(engine, PoolConfig(k=args.k), c).__aenter__() for n, c in ctls.items()} \
            if args.keep_pools else {}

        async def run(name: str, label: str) -> dict[str, float]:
            reqs = step_requests(specs, args.k, args.unit, label)
            if name in ("static", "verl"):
                return await run_baseline(StaticByGroup if name == "static" else LeastInflight, clients, reqs, label)
            if name in kept:
                return await run_pool(kept[name], reqs, label)
            async with RolloutPool(engine, PoolConfig(k=args.k), ctls[name]) as pool:  # opened off the clock
                return await run_pool(pool, reqs, label)

        try:
            await run_baseline(StaticByGroup, clients, step_requests(specs[:2], 2, "group", "warm"), "warm-up")
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}: load average (1/5/15 min) at start {_load()}", flush=True)
                if os.getloadavg()[0] > MAX_LOAD:
                    print(f"  WARNING: 1-minute load above {MAX_LOAD:g} at this round's start", flush=True)
                for name in order(CONTENDERS, r):
                    await meter.wait_quiet()
                    got = await rounds.measure(name, lambda: run(name, f"{name}-r{r}"), "makespan s,tokens,client cpu s")
                    if got["tokens"] != total:
                        raise SystemExit(f"{name} made {got['tokens']} tokens, expected {total}")
                print(f"round {r + 1}/{args.rounds}: load average at end {_load()}", flush=True)
        finally:
            for pool in kept.values():
                await pool.__aexit__(None, None, None)
            for c in clients:
                await c.aclose()
            await meter.aclose()
    finally:
        for p in procs:
            p.stop()
    what = (f"engine0 normal + engine1 KV-starved ({kv[1]} KV tokens)" if starved else
            f"homogeneous pair ({kv[0]} / {kv[1]} KV tokens)")
    header(f"{'hetero' if starved else 'pair'}: {what}, {args.groups} groups × k={args.k} ({total} tokens, one "
           f"{'n=1 request per sample' if args.unit == 'sample' else 'n=k request per group'}), lognormal lengths "
           f"(mean {args.mean:.0f}, σ {args.sigma}); every contender on the pool's aiohttp client; pools "
           f"{'kept across rounds' if args.keep_pools else 'fresh per run (opened off the clock)'}; "
           f"engines {'without' if args.plain_engines else 'in'} dev mode; load at start {load_at_start:.1f}", args.rounds)
    summarize(rounds, "hetero" if starved else "pair", load_at_start)


def summarize(rounds: Rounds, variant: str, load_at_start: float) -> None:
    key = "makespan s"
    st = rounds.median("static", key)
    # The benchmark process's CPU (the pool, or a baseline's client): on 2 cores it is taken from the engines.
    rounds.table([("median makespan (s)", key), ("median client CPU (s)", "client cpu s")], per_round=key,
                 extra=lambda n: [f"{rounds.worst(n, key):.2f}", f"{rounds.median(n, key) / st:.2f}×",
                                  f"{rounds.worst(n, key) / st:.2f}×"],
                 extra_headers=["worst (s)", "median ÷ static median", "worst ÷ static median"])
    med = {n: rounds.median(n, key) for n in CONTENDERS}
    pw = rounds.worst("pool", key)
    loads = [b for runs in rounds.runs.values() for _, b in (r.load for r in runs)]
    print(f"\nSUMMARY {variant}: static median {med['static']:.2f} s | verl median {med['verl']:.2f} s "
          f"({med['verl'] / st:.2f}×) | pool median {med['pool']:.2f} s ({med['pool'] / st:.2f}×, target ≤ 1.0) "
          f"worst {pw:.2f} s ({pw / st:.2f}× static median, target ≤ 1.3) | pool_off median {med['pool_off']:.2f} s "
          f"({med['pool_off'] / st:.2f}×) | load {load_at_start:.1f} at start, max {max(loads, default=0):.1f} "
          f"after a run")
    ok = med["pool"] / st <= 1.0 and pw / st <= 1.3
    print(f"SUMMARY {variant}: targets {'MET' if ok else 'MISSED'} (pool median ÷ static {med['pool'] / st:.2f} ≤ 1.0; "
          f"pool worst ÷ static median {pw / st:.2f} ≤ 1.3; pool ÷ pool_off {med['pool'] / med['pool_off']:.2f}; "
          f"spread of pool rounds {statistics.pstdev(_vals(rounds, 'pool', key)):.2f} s)")


def _vals(rounds: Rounds, name: str, key: str) -> list[float]:
    return [r.values[key] for r in rounds.runs.get(name, []) if key in r.values] or [float("nan")]
