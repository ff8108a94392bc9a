"""What streaming costs in throughput: the price of prefix-preserving failover (run by hand, not a test).

    .venv/bin/python benchmarks/stream_cost.py [--samples 256] [--tokens 512] [--rounds 3]

A streamed call lets the pool see every sample's tokens as they come, so a sample whose engine dies
or hangs continues elsewhere from them (``pool.stream_min_tokens``); a plain call loses them. One
real vLLM CPU engine, the same requests through the pool with streaming off and on, interleaved
rounds, medians; the load average is printed next to each row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, EngineConfig, PoolConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams


async def one(urls: list[str], key: str, model: str, stream: bool, args) -> tuple[float, float]:
    engine = EngineConfig(urls=urls, api_key=key, served_model_name=model, max_model_len=1024)
    pool_cfg = PoolConfig(per_engine=args.samples, pack_size=16, stream_min_tokens=0 if stream else None)
    sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    reqs = [Request(f"r{i}", [1, 10 + i % 50, 20, 30], sampling=sp) for i in range(args.samples)]
    async with RolloutPool(engine, pool_cfg, ControllerConfig(mode=ControllerMode.off)) as pool:
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await pool.generate(reqs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert all(r.ok and r.output_tokens == args.tokens for r in results)
    return sum(r.output_tokens for r in results) / wall, cpu / args.samples * 1e3


async def main(args) -> None:
    from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports

    model = resolve_model("embedded:tiny-llama")
    cfg = EngineConfig(model=model, max_model_len=1024, cpu_kvcache_gb=2, log_dir="logs/bench")
    (port,) = reserve_ports(cfg.host, 0, 1)
    proc = EngineProcess(0, cfg, model=model, port=port, max_num_seqs=args.samples, cpu_bind=None,
                         log_dir=Path(cfg.log_dir))
    proc.start()
    try:
        await proc.wait_ready(600)
        await one([proc.url], proc.api_key, model, False, argparse.Namespace(samples=16, tokens=32))  # warm-up
        rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        load0 = os.getloadavg()[0]
        for r in range(args.rounds):
            for stream in ((False, True) if r % 2 == 0 else (True, False)):
                rows[stream].append(await one([proc.url], proc.api_key, model, stream, args))
        load1 = os.getloadavg()[0]
    finally:
        proc.stop()
    print(f"{args.samples} samples × {args.tokens} tokens, one engine, {args.rounds} interleaved rounds "
          f"(load {load0:.1f} -> {load1:.1f})")
    print("| calls | tok/s (median) | client CPU ms/sample | ratio |")
    print("|---|---:|---:|---:|")
    base = statistics.median(t for t, _ in rows[False])
    for stream in (False, True):
        tps = statistics.median(t for t, _ in rows[stream])
        cpu = statistics.median(c for _, c in rows[stream])
        print(f"| {'streamed (SSE)' if stream else 'plain JSON'} | {tps:.0f} | {cpu:.2f} | {tps / base:.3f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
