"""Issue 23: one vLLM CPU engine's prefix-cache counters vs the simulator's, on the same multi-turn workload.

GROUPS x K sessions of TURNS turns: a group's sessions share a random first prompt; every turn is forced to OUT
tokens (ignore_eos) and the next prompt is prompt + the tokens returned + TOOL random tokens (a tool's output).
Real: /v1/completions with token ids, counters vllm:prefix_cache_queries / vllm:prefix_cache_hits from /metrics.
Sim: the same sessions on one simulated cpu_tiny engine (block 128), its cache's queries and hits.

    .venv/bin/python benchmarks/sim_prefix_calibrate.py sim    # the simulator only
    .venv/bin/python benchmarks/sim_prefix_calibrate.py real   # starts ONE vLLM CPU engine, then both
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

GROUPS, K, TURNS, PROMPT, OUT, TOOL, TOOL_S = 4, 4, 4, 300, 40, 60, 0.2
VOCAB = 2404  # the embedded tiny Llama's; ids 0-2 are pad/bos/eos


def first_prompts(rng: random.Random) -> list[list[int]]:
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(PROMPT - 1)] for _ in range(GROUPS)]


def tool_ids(rng: random.Random) -> dict[tuple[int, int, int], list[int]]:
    return {(g, s, t): [rng.randrange(3, VOCAB) for _ in range(TOOL)]
            for g in range(GROUPS) for s in range(K) for t in range(TURNS)}


def sim() -> dict:
    from rollout_plugin.sim.client import CONTENT_KEY, OUTPUT_KEY, PROMPT_KEY, SimEngineClient
    from rollout_plugin.sim.engine import SimEngine
    from rollout_plugin.sim.loop import run_virtual
    from rollout_plugin.sim.prefix_cache import PrefixCache, Reused, output_segment
    from rollout_plugin.sim.profile import load_profile
    from rollout_plugin.types import Request, SamplingParams

    profile = load_profile("cpu_tiny")

    async def main():
        engine = SimEngine("e", profile, prefix_cache=PrefixCache(profile.block_size, Reused()))
        client = SimEngineClient(engine)

        async def session(g: int, s: int) -> None:
            content, ctx = ((("prompt", g), PROMPT),), PROMPT
            for t in range(TURNS):
                if t:
                    await asyncio.sleep(TOOL_S)
                rid = f"g{g}s{s}t{t}"
                await client.generate([Request(rid, "x", sampling=SamplingParams(max_tokens=OUT), metadata={
                    PROMPT_KEY: ctx, OUTPUT_KEY: (OUT,), CONTENT_KEY: content})])
                content += ((output_segment(rid, 0), OUT), (("tool", g, s, t), TOOL))
                ctx += OUT + TOOL

        await asyncio.gather(*(session(g, s) for g in range(GROUPS) for s in range(K)))
        return engine.cache

    c = run_virtual(main())
    return {"queries": c.queries, "hits": c.hits, "reusable": c.reusable}


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_total{") or line.startswith(name + "_total "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def real() -> dict:
    import httpx

    from rollout_plugin.config.schema import EngineConfig
    from rollout_plugin.model.embedded import resolve_model
    from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports

    model = resolve_model("embedded:tiny-llama")
    cfg = EngineConfig(model=model, api_key="calib", max_model_len=1024, cpu_kvcache_gb=1, log_dir="logs/bench")
    proc = EngineProcess(0, cfg, model=model, port=reserve_ports("127.0.0.1", 0, 1)[0], max_num_seqs=64,
                         cpu_bind="0", log_dir=Path(cfg.log_dir))
    proc.start()
    try:
        await proc.wait_ready(600)
        rng = random.Random(0)
        firsts, tools = first_prompts(rng), tool_ids(rng)
        async with httpx.AsyncClient(headers={"Authorization": "Bearer calib"}, timeout=600) as http:
            before = (await http.get(f"{proc.url}/metrics")).text
            served = (await http.get(f"{proc.url}/v1/models")).json()["data"][0]["id"]

            async def session(g: int, s: int) -> None:
                prompt = list(firsts[g])
                for t in range(TURNS):
                    if t:
                        await asyncio.sleep(TOOL_S)
                    r = await http.post(f"{proc.url}/v1/completions", json={
                        "model": served, "prompt": prompt, "max_tokens": OUT, "min_tokens": OUT, "ignore_eos": True,
                        "temperature": 1.0, "return_token_ids": True})
                    r.raise_for_status()
                    out = r.json()["choices"][0]["token_ids"]
                    assert len(out) == OUT, len(out)
                    prompt += list(out) + tools[(g, s, t)]

            t0 = time.monotonic()
            await asyncio.gather(*(session(g, s) for g in range(GROUPS) for s in range(K)))
            wall = time.monotonic() - t0
            await asyncio.sleep(2.0)  # the stat logger's last interval
            after = (await http.get(f"{proc.url}/metrics")).text
        q = _counter(after, "vllm:prefix_cache_queries") - _counter(before, "vllm:prefix_cache_queries")
        h = _counter(after, "vllm:prefix_cache_hits") - _counter(before, "vllm:prefix_cache_hits")
        block = [ln for ln in after.splitlines() if ln.startswith("vllm:cache_config_info")]
        return {"queries": q, "hits": h, "wall_s": round(wall, 2), "cache_config": block[:1]}
    finally:
        proc.stop()


if __name__ == "__main__":
    out = {"workload": dict(groups=GROUPS, k=K, turns=TURNS, prompt=PROMPT, out=OUT, tool=TOOL), "sim": sim()}
    if sys.argv[1:] == ["real"]:
        out["real"] = asyncio.run(real())
    for side in ("sim", "real"):
        if side in out and out[side]["queries"]:
            out[side]["hits_per_query"] = round(out[side]["hits"] / out[side]["queries"], 4)
    print(json.dumps(out, indent=1))
