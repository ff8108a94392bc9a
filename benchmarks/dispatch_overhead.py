"""Dispatcher cost per request and memory with a deep queue (run by hand, not a test).

    .venv/bin/python benchmarks/dispatch_overhead.py [--requests 100000] [--repeats 3]

An in-process engine answers every call at once, so what is measured is the pool itself:
admission, packing, routing, bookkeeping, futures. Targets: ≤ 30 µs CPU per request at pack size 1,
≤ 15 µs at 64, ≤ 1 GB RSS with 100k requests queued; and with a distinct seed per request (nothing
packs: every request is its own pack key) the cost per request flat from 1k to 100k queued (≤ 1.5×).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from fakes import FakeEngine  # noqa: E402

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig  # noqa: E402
from rollout_plugin.pool.api.pool import RolloutPool  # noqa: E402
from rollout_plugin.types import Request, SamplingParams  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def one_run(n: int, pack: int, engines: int, distinct: bool = False) -> tuple[float, float, float]:
    fakes = [FakeEngine(f"e{i}", tokens=1) for i in range(engines)]
    cfg = PoolConfig(per_engine=256, pack_size=pack)
    reqs = [Request(f"r{i}", "p", sampling=SamplingParams(seed=i) if distinct else SamplingParams()) for i in range(n)]
    async with RolloutPool(pool=cfg, controller=ControllerConfig(mode=ControllerMode.off), clients=fakes) as pool:
        before = rss_mb()
        futures = [pool.submit(r) for r in reqs]
        queued_rss = rss_mb()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*futures)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert len(results) == n and all(r.ok for r in results)
    return cpu / n * 1e6, wall / n * 1e6, queued_rss - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{args.requests} requests, {args.engines} in-process engines, medians of {args.repeats}")
    print("| pack size | CPU µs/request | wall µs/request | RSS for the queued requests (MB) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|")
    for pack in (1, 16, 64):
        runs = [asyncio.run(one_run(args.requests, pack, args.engines)) for _ in range(args.repeats)]
        cpu, wall, mem = (statistics.median(x) for x in zip(*runs))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {pack} | {cpu:.1f} | {wall:.1f} | {mem:.0f} | {peak:.0f} |", flush=True)
    print()
    print("Distinct seeds (no request packs with another), pack size 64:")
    print("| queued requests | CPU µs/request | wall µs/request |")
    print("|---:|---:|---:|")
    base = None
    for n in (1_000, 10_000, args.requests):
        runs = [asyncio.run(one_run(n, 64, args.engines, distinct=True)) for _ in range(args.repeats)]
        cpu, wall, _ = (statistics.median(x) for x in zip(*runs))
        base = base or cpu
        print(f"| {n} | {cpu:.1f} ({cpu / base:.2f}× the 1k row) | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
