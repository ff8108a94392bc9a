"""What overlapping verification with generation buys (run by hand).

    .venv/bin/python benchmarks/verify_overlap.py [--rounds 3] [--prompts 64] [--k 4] [--verify-s 0.05]

One real CPU engine; a deliberately slow verifier (sleeps --verify-s per sample, 4 workers).
Rounds alternate:
- A, inline (overlapped): `collect` scores each group as it arrives, beside generation;
- B, sequential: `collect verify=deferred` generates everything, then `verify` scores the file.
Time to the last reward is A's generation + verification tail against B's generation + verify
job; generation throughput (samples/s until the last result) shows whether the verifier slowed
generation down. Medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from rollout_plugin.collect.job import collect  # noqa: E402
from rollout_plugin.config.schema import (  # noqa: E402
    CollectConfig, EngineConfig, PoolConfig, Progress, SamplingConfig, VerifyConfig, VerifyTiming)
from rollout_plugin.model.embedded import resolve_model  # noqa: E402
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports  # noqa: E402
from rollout_plugin.verify.job import VerifyJobConfig, verify_file  # noqa: E402

VERIFIER = "verifiers_for_tests:slow_length"


async def inline(base: CollectConfig, out: Path) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    s = await collect(replace(base, output=str(out)))
    return time.perf_counter() - t0, s.samples_per_s, s.verify_wait_s


async def sequential(base: CollectConfig, out: Path, workers: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    s = await collect(replace(base, output=str(out), verify=replace(base.verify, timing=VerifyTiming.deferred)))
    await verify_file(VerifyJobConfig(input=str(out), parallelism=workers, verify=base.verify,
                                      progress=Progress.off))
    return time.perf_counter() - t0, s.samples_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--verify-s", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=4)
    # A per-engine cap below the batch makes results arrive in waves, as in a real step where the
    # batch exceeds what the engines hold at once; with everything in flight at once (and equal
    # lengths) every result lands at the end and nothing is left to overlap.
    ap.add_argument("--per-engine", type=int, default=32)
    args = ap.parse_args()
    os.environ["SLOW_VERIFIER_S"] = str(args.verify_s)
    model = resolve_model("embedded:tiny-llama")
    tmp = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    ecfg = EngineConfig(model=model, max_model_len=512, cpu_kvcache_gb=1, log_dir=str(tmp), startup_timeout_s=1200)
    (port,) = reserve_ports(ecfg.host, 0, 1)
    engine = EngineProcess(0, ecfg, model=model, port=port, max_num_seqs=256, cpu_bind=None, log_dir=tmp)
    engine.start()
    try:
        asyncio.run(engine.wait_ready())
        base = CollectConfig(
            engine=EngineConfig(urls=[engine.url], api_key=engine.api_key, served_model_name=model, max_model_len=512),
            pool=PoolConfig(k=args.k, per_engine=args.per_engine), sampling=SamplingConfig(max_tokens=64, ignore_eos=True),
            verify=VerifyConfig(verifier=VERIFIER, workers=args.workers, cache_size=0),
            limit=args.prompts, progress=Progress.off, log_level="WARNING", overwrite=True)
        a_total, a_gen, a_tail, b_total, b_gen = [], [], [], [], []
        for r in range(args.rounds):
            total, gen, tail = asyncio.run(inline(base, tmp / f"a{r}.jsonl"))
            a_total.append(total), a_gen.append(gen), a_tail.append(tail)
            total, gen = asyncio.run(sequential(base, tmp / f"b{r}.jsonl", args.workers))
            b_total.append(total), b_gen.append(gen)
    finally:
        engine.stop()
    med = statistics.median
    n = args.prompts * args.k
    print(f"1 CPU engine (pool.per_engine={args.per_engine}), {args.prompts} prompts x k={args.k} = {n} samples, "
          f"64 tokens each; verifier "
          f"{args.verify_s * 1e3:.0f} ms/sample on {args.workers} workers "
          f"(= {n * args.verify_s / args.workers:.1f} s of verification); medians of {args.rounds} rounds")
    print("| mode | time to last reward (s) | generation samples/s | verification after last result (s) |")
    print("|---|---:|---:|---:|")
    print(f"| A inline (overlapped) | {med(a_total):.1f} | {med(a_gen):.1f} | {med(a_tail):.1f} |")
    print(f"| B deferred, then verify | {med(b_total):.1f} | {med(b_gen):.1f} | (all of it) |")
    print(f"| overlap gain | {med(b_total) / med(a_total):.2f}x | generation A/B {med(a_gen) / med(b_gen):.2f} | |")


if __name__ == "__main__":
    main()
