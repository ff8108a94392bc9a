"""How close the pool gets to the engines' capacity (run by hand; real vLLM CPU engines).

    .venv/bin/python benchmarks/pool_efficiency.py pair    [--prompts 128] [--k 8] [--repeats 3]
    .venv/bin/python benchmarks/pool_efficiency.py starved [--requests 512] [--blocks 64] [--repeats 3]

pair     Homogeneous pair (each engine bound to its own core), one GRPO step with lognormal response
         lengths forced by ``min_tokens = max_tokens`` + ``ignore_eos``. Makespan against the ideal:
         the step's tokens ÷ the pair's throughput measured in the same run on a saturating uniform
         workload (and, since no schedule beats its longest sample, the longest group's own time).
         Contenders: the pool with groups auto / together / split.
starved  One KV-starved engine (``--num-gpu-blocks-override``): the adaptive controller (preset: the
         largest swept cap; it starts at its KV-based estimate) against a sweep of fixed caps
         (controller=off), the pool with every request in flight (controller=off, cap = requests) and an
         unbounded raw client (every request at once). Target (issue 13): adaptive ≥ 0.95 × max(best
         fixed, unbounded).

Rounds interleave the contenders; medians are printed as a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
from datetime import date
from pathlib import Path

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, GroupConfig, PoolConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams

KEY = "bench"
MAX_MODEL_LEN = 1024


def lognormal_lengths(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(min(480, max(16, rng.lognormvariate(4.6, 0.6)))) for _ in range(count)]  # median ~100


def forced(length: int) -> SamplingParams:
    return SamplingParams(max_tokens=length, min_tokens=length, ignore_eos=True)


def start_engines(model: str, extras: list[list[str]], binds: list[str | None]) -> list[EngineProcess]:
    ports = reserve_ports("127.0.0.1", 0, len(extras))
    procs = []
    for i, (extra, bind) in enumerate(zip(extras, binds)):
        cfg = EngineConfig(model=model, api_key=KEY, max_model_len=MAX_MODEL_LEN, cpu_kvcache_gb=2, extra_args=extra,
                           log_dir="logs/bench")
        procs.append(EngineProcess(i, cfg, model=model, port=ports[i], max_num_seqs=512, cpu_bind=bind,
                                   log_dir=Path(cfg.log_dir)))
    for p in procs:
        p.start()
    return procs


async def run_pool(urls: list[str], model: str, reqs: list[Request], pool_cfg: PoolConfig,
                   ctl: ControllerConfig) -> tuple[float, int]:
    """(makespan s, output tokens) of one batch through a fresh pool (engines already warm)."""
    engine = EngineConfig(urls=urls, api_key=KEY, served_model_name=model, max_model_len=MAX_MODEL_LEN)
    async with RolloutPool(engine, pool_cfg, ctl) as pool:
        t0 = time.perf_counter()
        results = await pool.generate(reqs)
        span = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} request(s) failed, e.g. {bad[0].error}")
    return span, sum(r.output_tokens for r in results)


async def pair(urls: list[str], model: str, args) -> None:
    lengths = lognormal_lengths(args.prompts, seed=1)
    step = [Request(f"g{i}", f"Problem {i}: what is {i} times {i + 3}?", n=args.k, sampling=forced(n))
            for i, n in enumerate(lengths)]
    step_tokens = sum(lengths) * args.k
    uniform = [Request(f"u{i}", f"Story {i}:", sampling=forced(128)) for i in range(args.prompts * args.k)]
    ctl = ControllerConfig(expected_tokens=int(statistics.mean(lengths)) + 32)
    # The longest group alone on an idle engine: no schedule of this step can end before it does.
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    floor_span, _ = await run_pool(urls[:1], model, [step[longest]], PoolConfig(k=args.k), ctl)
    rows: dict[str, list[float]] = {"throughput": [], "auto": [], "together": [], "split": []}
    for r in range(args.repeats):
        span, tokens = await run_pool(urls, model, uniform, PoolConfig(k=1), ctl)
        rows["throughput"].append(tokens / span)
        print(f"round {r + 1}: pair throughput {tokens / span:.0f} tok/s (uniform 128-token samples)", flush=True)
        for mode in ("auto", "together", "split"):
            span, tokens = await run_pool(urls, model, step, PoolConfig(k=args.k, groups=GroupConfig(mode=mode)), ctl)
            assert tokens == step_tokens, (tokens, step_tokens)
            rows[mode].append(span)
            ideal = max(step_tokens / rows["throughput"][-1], floor_span)
            print(f"  groups={mode:<9} {span:6.1f} s  = {span / ideal:.2f}x ideal ({ideal:.1f} s)", flush=True)
    tp = statistics.median(rows["throughput"])
    ideal = max(step_tokens / tp, floor_span)
    print(f"\n{date.today()} {platform.node()}: homogeneous pair, {args.prompts} prompts x k={args.k}, "
          f"{step_tokens} tokens, lognormal lengths; medians of {args.repeats}")
    print(f"pair throughput {tp:.0f} tok/s -> ideal {step_tokens / tp:.1f} s; longest group alone {floor_span:.1f} s")
    print("| pool groups | makespan (s) | × ideal |\n|---|---:|---:|")
    for mode in ("auto", "together", "split"):
        m = statistics.median(rows[mode])
        print(f"| {mode} | {m:.1f} | {m / ideal:.2f}× |")


async def unbounded(url: str, model: str, reqs: list[Request]) -> float:
    """Every request at once on its own HTTP call, no client cap: vLLM's scheduler is the only guard."""
    import httpx

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=3600,
                                 limits=httpx.Limits(max_connections=len(reqs))) as http:
        async def one(r: Request) -> None:
            body = {"model": model, "prompt": r.prompt, "max_tokens": r.sampling.max_tokens,
                    "min_tokens": r.sampling.min_tokens, "ignore_eos": True}
            (await http.post(f"{url}/v1/completions", json=body)).raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - t0


async def starved(urls: list[str], model: str, args) -> None:
    lengths = lognormal_lengths(args.requests, seed=2)
    reqs = [Request(f"r{i}", f"Tell me about {i}", sampling=forced(n)) for i, n in enumerate(lengths)]
    tokens = sum(lengths)
    caps = [int(c) for c in args.caps.split(",")]
    # expected_tokens deliberately generic (max_model_len / 4): the controller must find the cap itself.
    adaptive = ControllerConfig(expected_tokens=MAX_MODEL_LEN // 4)
    off = ControllerConfig(mode="off")
    spans: dict[str, list[float]] = {}
    loads = [os.getloadavg()[0]]

    def record(label: str, span: float) -> None:
        spans.setdefault(label, []).append(span)
        print(f"  {label:<24} {span:6.1f} s  {tokens / span:6.0f} tok/s  (load {os.getloadavg()[0]:.1f})", flush=True)

    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        for cap in caps:
            record(f"fixed {cap}", (await run_pool(urls, model, reqs, PoolConfig(per_engine=cap,
                                                                                 over_concurrency_ratio=1.0), off))[0])
        # The controller starts below the largest swept cap (its KV-based estimate) and must find its way;
        # with the pool's defaults (cap 1024 × 1.2) every request is dispatched before its first look.
        record("adaptive", (await run_pool(urls, model, reqs, PoolConfig(per_engine=max(caps)), adaptive))[0])
        record("adaptive, pool defaults", (await run_pool(urls, model, reqs, PoolConfig(), adaptive))[0])
        record("pool, all in flight", (await run_pool(urls, model, reqs, PoolConfig(
            per_engine=len(reqs), over_concurrency_ratio=1.0), off))[0])
        record("unbounded", await unbounded(urls[0], model, reqs))
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in spans.items()}
    best = min((k for k in med if k.startswith("fixed")), key=med.__getitem__)
    ref = min(med[best], med["unbounded"])
    print(f"\n{date.today()} {platform.node()}: one engine, {args.blocks} KV blocks, {args.requests} requests, "
          f"{tokens} tokens, lognormal lengths; medians of {args.repeats}; best fixed: {best}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print("| client | makespan (s) | tok/s | vs best fixed | vs max(best fixed, unbounded) |\n"
          "|---|---:|---:|---:|---:|")
    for k, m in med.items():
        print(f"| {k} | {m:.1f} | {tokens / m:.0f} | {med[best] / m:.2f} | {ref / m:.2f} |")
    print(f"\nadaptive ÷ max(best fixed, unbounded) = {ref / med['adaptive']:.2f} (target ≥ 0.95)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["pair", "starved"])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=64, help="KV blocks (16 tokens each) of the starved engine")
    ap.add_argument("--caps", default="8,16,32,64,128", help="fixed caps swept in `starved`")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = resolve_model("embedded:tiny-llama")
    if args.which == "pair":
        procs = start_engines(model, [[], []], ["0", "1"])
    else:
        procs = start_engines(model, [["--num-gpu-blocks-override", str(args.blocks)]], [None])
    try:
        async def go() -> None:
            await asyncio.gather(*(p.wait_ready() for p in procs))
            urls = [p.url for p in procs]
            warm = [Request(f"w{i}", "warm", sampling=forced(8)) for i in range(8)]
            await run_pool(urls, model, warm, PoolConfig(), ControllerConfig(mode="off"))
            await (pair if args.which == "pair" else starved)(urls, model, args)

        asyncio.run(go())
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
