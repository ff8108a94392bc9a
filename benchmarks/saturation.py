"""How close the pool gets to the engine's offline ceiling (run by hand, not a test).

    .venv/bin/python benchmarks/saturation.py [--samples 512] [--max-tokens 128] [--repeats 3]

Same prompts and sampling for every pattern (ignore_eos, so every sample is exactly max_tokens long):
  offline      vLLM ``LLM.generate`` with the whole batch at once, in a separate process (the ceiling)
  per-sample   one HTTP request per sample, all in flight
  pack-N       multi-prompt /v1/completions calls of N prompts
  group-n8     one request per GRPO group with n=8
  pool         RolloutPool (k=1, default packing), attached to the same server
  pool-k8      RolloutPool with groups of k=8
Server patterns run interleaved, repeated, and are reported as medians and as ratios to offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

import httpx

from rollout_plugin.collect.dataset import load_examples
from rollout_plugin.config.schema import EngineConfig, PoolConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.types import Request, SamplingParams

# Run from a file with a main guard: vLLM starts its engine worker with spawn, which re-imports __main__.
OFFLINE = textwrap.dedent("""
    import json, sys, time

    def main():
        from vllm import LLM, SamplingParams
        model, prompts, max_tokens, repeats, max_num_seqs, max_model_len = json.loads(open(sys.argv[1]).read())
        llm = LLM(model=model, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=0)
        sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
        llm.generate(prompts[:32], sp, use_tqdm=False)  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
        print("RATES", json.dumps(rates), flush=True)

    if __name__ == "__main__":
        main()
""")


def prompts_for(samples: int) -> list[str]:
    base = [ex.prompt for ex in load_examples(None)]
    return [f"{base[i % len(base)]} (#{i})" for i in range(samples)]


def offline_rates(python: str, model: str, prompts: list[str], args) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        script, payload = Path(tmp) / "offline.py", Path(tmp) / "payload.json"
        script.write_text(OFFLINE)
        payload.write_text(json.dumps([model, prompts, args.max_tokens, args.repeats, args.max_num_seqs,
                                       args.max_model_len]))
        proc = subprocess.run([python, str(script), str(payload)], capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RATES ")), None)
    if line is None:
        sys.exit(f"offline run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[6:])


class Server:
    def __init__(self, url: str, key: str, model: str, max_tokens: int):
        self.url, self.model = url, model
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=1800,
                                      limits=httpx.Limits(max_connections=1024))
        self.body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True,
                     "return_token_ids": True}

    async def call(self, prompts: list[str], n: int = 1) -> int:
        resp = await self.http.post(f"{self.url}/v1/completions", json={**self.body, "prompt": prompts, "n": n})
        resp.raise_for_status()
        return sum(len(c["token_ids"]) for c in resp.json()["choices"])

    async def packs(self, prompts: list[str], size: int) -> int:
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        return sum(await asyncio.gather(*(self.call(c) for c in chunks)))

    async def groups(self, prompts: list[str], n: int) -> int:
        return sum(await asyncio.gather(*(self.call([p], n) for p in prompts[: len(prompts) // n])))


async def pool_tokens(url: str, key: str, prompts: list[str], k: int, max_tokens: int, max_model_len: int) -> int:
    sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
    engine = EngineConfig(urls=[url], api_key=key, max_model_len=max_model_len)
    async with RolloutPool(engine, PoolConfig(k=k)) as pool:
        reqs = [Request(f"p{i}", p, n=k, sampling=sp) for i, p in enumerate(prompts[: len(prompts) // k])]
        results = await pool.generate(reqs)
    return sum(r.output_tokens for r in results)


async def measure(label: str, fn) -> float:
    t0 = time.perf_counter()
    tokens = await fn()
    rate = tokens / (time.perf_counter() - t0)
    print(f"  {label:<11} {rate:9.0f} tok/s", flush=True)
    return rate


async def server_rates(proc: EngineProcess, model: str, prompts: list[str], args) -> dict[str, list[float]]:
    srv = Server(proc.url, proc.api_key, model, args.max_tokens)
    patterns = {
        "per-sample": lambda: srv.packs(prompts, 1),
        "pack-4": lambda: srv.packs(prompts, 4),
        "pack-16": lambda: srv.packs(prompts, 16),
        "pack-64": lambda: srv.packs(prompts, 64),
        "group-n8": lambda: srv.groups(prompts, 8),
        "pool": lambda: pool_tokens(proc.url, proc.api_key, prompts, 1, args.max_tokens, args.max_model_len),
        "pool-k8": lambda: pool_tokens(proc.url, proc.api_key, prompts, 8, args.max_tokens, args.max_model_len),
    }
    await srv.packs(prompts[:64], 16)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in patterns}
    for r in range(args.repeats):  # interleaved, so drift hits every pattern alike
        print(f"round {r + 1}/{args.repeats}", flush=True)
        for name, fn in patterns.items():
            rates[name].append(await measure(name, fn))
    await srv.http.aclose()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--engine-python", default=sys.executable)
    args = ap.parse_args()

    model = resolve_model("embedded:tiny-llama", args.engine_python)
    prompts = prompts_for(args.samples)
    print(f"offline ceiling: {args.samples} samples x {args.max_tokens} tokens, {args.repeats} repeats", flush=True)
    offline = offline_rates(args.engine_python, model, prompts, args)
    print("  offline     " + "  ".join(f"{r:.0f}" for r in offline), flush=True)

    cfg = EngineConfig(model=model, python=args.engine_python, max_model_len=args.max_model_len, cpu_kvcache_gb=4,
                       log_dir="logs/bench")
    (port,) = reserve_ports(cfg.host, 0, 1)
    proc = EngineProcess(0, cfg, model=model, port=port, max_num_seqs=args.max_num_seqs, cpu_bind=None,
                         log_dir=Path(cfg.log_dir))
    proc.start()
    try:
        asyncio.run(proc.wait_ready())
        rates = asyncio.run(server_rates(proc, model, prompts, args))
    finally:
        proc.stop()

    ceiling = statistics.median(offline)
    print(f"\n{date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{args.samples} samples x {args.max_tokens} tokens, medians of {args.repeats}")
    print(f"| pattern | tok/s (median) | ratio to offline |\n|---|---:|---:|\n| offline | {ceiling:.0f} | 1.00 |")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / ceiling:.2f} |")


if __name__ == "__main__":
    main()
