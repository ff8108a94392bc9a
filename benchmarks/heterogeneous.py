"""One GRPO step on a heterogeneous engine pair: our pool vs the baselines trainers use (run by hand).

    .venv/bin/python benchmarks/heterogeneous.py [--prompts 64] [--k 8] [--blocks 64] [--repeats 3]

Two real vLLM CPU engines, each bound to its own core; engine1 is KV-starved
(``--num-gpu-blocks-override``). Response lengths are lognormal per group and forced with
``min_tokens = max_tokens`` + ``ignore_eos`` so every contender generates exactly the same tokens.
Contenders, interleaved per round, step makespan as the metric:
  static     TRL server mode / static DP: each engine gets half the groups up front
  verl       all groups at once, least-in-flight by count, no cap (single-turn: a static split too)
  distllm    batches of 16 groups (0.5 s timeout) sent as concurrent requests, one batch at a time
  pool       RolloutPool, adaptive per-engine caps, least-loaded routing, packed calls
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams


def workload(prompts: int, k: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(prompts):
        length = int(min(480, max(16, rng.lognormvariate(4.6, 0.6))))  # median ~100 tokens, long tail
        out.append((f"Problem {i}: what is {i} times {i + 3}?", length))
    return out


class Raw:
    """A plain client (the baselines): one request per group with n=k."""

    def __init__(self, urls: list[str], key: str, model: str):
        self.urls, self.model = urls, model
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=3600,
                                      limits=httpx.Limits(max_connections=4096))

    async def group(self, engine: int, prompt: str, length: int, k: int) -> int:
        body = {"model": self.model, "prompt": prompt, "n": k, "max_tokens": length, "min_tokens": length,
                "ignore_eos": True, "temperature": 1.0, "return_token_ids": True}
        resp = await self.http.post(f"{self.urls[engine]}/v1/completions", json=body)
        resp.raise_for_status()
        return sum(len(c["token_ids"]) for c in resp.json()["choices"])


async def static_split(raw: Raw, work, k: int) -> int:
    return sum(await asyncio.gather(*(raw.group(i % 2, p, n, k) for i, (p, n) in enumerate(work))))


async def verl_router(raw: Raw, work, k: int) -> int:
    inflight = [0, 0]

    async def one(p: str, n: int) -> int:
        e = min((0, 1), key=lambda j: (inflight[j], j))  # least in flight by request count, no cap
        inflight[e] += 1
        try:
            return await raw.group(e, p, n, k)
        finally:
            inflight[e] -= 1

    tasks = []
    for p, n in work:  # all submitted at once, as verl does
        tasks.append(asyncio.ensure_future(one(p, n)))
        await asyncio.sleep(0)  # let the task take its slot before the next picks
    return sum(await asyncio.gather(*tasks))


async def distllm(raw: Raw, work, k: int, batch: int = 16, timeout_s: float = 0.5) -> int:
    total, i = 0, 0
    queue = list(work)  # everything is already waiting, so a batch fills before its timeout
    while queue:
        chunk, queue = queue[:batch], queue[batch:]
        results = await asyncio.gather(*(raw.group((i + j) % 2, p, n, k) for j, (p, n) in enumerate(chunk)))
        total += sum(results)
        i += len(chunk)
    return total


async def ours(urls: list[str], key: str, model: str, work, k: int, max_model_len: int) -> int:
    engine = EngineConfig(urls=urls, api_key=key, served_model_name=model, max_model_len=max_model_len)
    reqs = [Request(f"g{i}", p, n=k, sampling=SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(work)]
    expected = int(statistics.mean(n for _, n in work)) + 32
    async with RolloutPool(engine, PoolConfig(k=k), ControllerConfig(expected_tokens=expected)) as pool:
        results = await pool.generate(reqs)
    return sum(r.output_tokens for r in results)


async def bench(urls: list[str], key: str, model: str, args) -> dict[str, list[float]]:
    raw = Raw(urls, key, model)
    work = workload(args.prompts, args.k, seed=0)
    expected_tokens = sum(n for _, n in work) * args.k
    contenders = {
        "static": lambda: static_split(raw, work, args.k),
        "verl": lambda: verl_router(raw, work, args.k),
        "distllm": lambda: distllm(raw, work, args.k),
        "pool": lambda: ours(urls, key, model, work, args.k, args.max_model_len),
    }
    await raw.group(0, "warm", 8, 2), await raw.group(1, "warm", 8, 2)
    spans: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            try:
                tokens = await fn()
            except httpx.HTTPError as exc:  # an uncapped baseline can overrun an engine: report, go on
                print(f"  {name:<8} FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}", flush=True)
                spans[name].append(float("inf"))
                continue
            spans[name].append(time.perf_counter() - t0)
            if tokens != expected_tokens:
                sys.exit(f"{name} made {tokens} tokens, expected {expected_tokens}")
            print(f"  {name:<8} {spans[name][-1]:7.1f} s  ({tokens / spans[name][-1]:.0f} tok/s)", flush=True)
    await raw.http.aclose()
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=64, help="KV blocks of the starved engine (16 tokens each)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="vLLM refuses a KV cache smaller than this")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = resolve_model("embedded:tiny-llama")
    procs = []
    try:
        ports = reserve_ports("127.0.0.1", 0, 2)
        for i, extra in enumerate(([], ["--num-gpu-blocks-override", str(args.blocks)])):
            cfg = EngineConfig(model=model, api_key="bench", max_model_len=args.max_model_len, cpu_kvcache_gb=2,
                               extra_args=extra,
                               log_dir="logs/bench")
            procs.append(EngineProcess(i, cfg, model=model, port=ports[i], max_num_seqs=256, cpu_bind=str(i),
                                       log_dir=Path(cfg.log_dir)))
        for p in procs:
            p.start()

        async def ready():
            await asyncio.gather(*(p.wait_ready() for p in procs))

        asyncio.run(ready())
        spans = asyncio.run(bench([p.url for p in procs], "bench", model, args))
    finally:
        for p in procs:
            p.stop()
    med = {name: statistics.median(v) for name, v in spans.items()}
    print(f"\n{date.today()} {platform.node()}, {args.prompts} prompts x k={args.k}, engine1 KV {args.blocks} blocks, "
          f"medians of {args.repeats}")
    print("| contender | step makespan (s) | pool speed-up |\n|---|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m:.1f} | {m / med['pool']:.2f}x |")


if __name__ == "__main__":
    main()
