"""The gateway's cost: the same requests straight to a vLLM engine and through `rollout-plugin serve` (run by hand).

    .venv/bin/python benchmarks/gateway_overhead.py [--rounds 5] [--sequential 20] [--concurrent 64]

One real CPU engine; the gateway is attached to it (engine.urls) in a subprocess, exactly as users
run it. Rounds alternate A (direct) and B (gateway); medians over rounds:
- sequential: one request at a time, latency per request (what a single caller pays);
- concurrent: N requests at once, wall time (what a batch caller pays).
The gateway process's own CPU time per request is read from /proc (it does not depend on how busy
the rest of the machine is, unlike the wall times on a shared box).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.launcher import EngineProcess, reserve_ports

BODY = {"prompt": "Count: 1 2 3", "max_tokens": 16, "temperature": 0.0, "ignore_eos": True}


async def sequential(http: httpx.AsyncClient, url: str, model: str, n: int, headers: dict) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        resp = await http.post(f"{url}/v1/completions", json={**BODY, "model": model}, headers=headers)
        resp.raise_for_status()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def concurrent(http: httpx.AsyncClient, url: str, model: str, n: int, headers: dict) -> float:
    t0 = time.perf_counter()
    resps = await asyncio.gather(*(http.post(f"{url}/v1/completions", json={**BODY, "model": model},
                                             headers=headers) for _ in range(n)))
    for r in resps:
        r.raise_for_status()
    return time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def measure(engine_url: str, key: str, gateway_url: str, model: str, args, pid: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("direct_seq", "gateway_seq", "direct_conc", "gateway_conc",
                                                   "gateway_cpu_ms")}
    direct_h = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as http:
        await sequential(http, engine_url, model, 3, direct_h)  # both paths warm before timing
        await sequential(http, gateway_url, model, 3, {})
        for _ in range(args.rounds):
            out["direct_seq"].append(await sequential(http, engine_url, model, args.sequential, direct_h))
            cpu0 = cpu_s(pid)
            out["gateway_seq"].append(await sequential(http, gateway_url, model, args.sequential, {}))
            out["direct_conc"].append(await concurrent(http, engine_url, model, args.concurrent, direct_h))
            cpu1 = cpu_s(pid)
            out["gateway_conc"].append(await concurrent(http, gateway_url, model, args.concurrent, {}))
            # The direct phase in between costs the gateway only its monitor's polling.
            out["gateway_cpu_ms"].append((cpu_s(pid) - cpu1 + cpu1 - cpu0) * 1e3 / (args.sequential + args.concurrent))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sequential", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=64)
    args = ap.parse_args()
    model = resolve_model("embedded:tiny-llama")
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    cfg = EngineConfig(model=model, max_model_len=512, cpu_kvcache_gb=1, log_dir=str(tmp), startup_timeout_s=1200)
    (port,) = reserve_ports(cfg.host, 0, 1)
    engine = EngineProcess(0, cfg, model=model, port=port, max_num_seqs=256, cpu_bind=None, log_dir=tmp)
    engine.start()
    gateway = None
    try:
        asyncio.run(engine.wait_ready())
        ready = tmp / "url"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "rollout_plugin.cli.main", "serve", f"engine.urls=[{engine.url}]",
             f"engine.api_key={engine.api_key}", f"engine.served_model_name={model}", "engine.max_model_len=512",
             "port=0", f"ready_file={ready}", "log_level=WARNING"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not ready.exists():
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("gateway did not start")
            time.sleep(0.2)  # polling for the ready file
        res = asyncio.run(measure(engine.url.rstrip("/").removesuffix("/v1"), engine.api_key,
                                  ready.read_text().strip(), model, args, gateway.pid))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=60)
        engine.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"1 CPU engine, max_tokens=16; medians of {args.rounds} alternating rounds")
    print("| path | sequential latency (ms/request) | concurrent x{} wall (s) |".format(args.concurrent))
    print("|---|---:|---:|")
    print(f"| direct to engine | {med['direct_seq'] * 1e3:.1f} | {med['direct_conc']:.2f} |")
    print(f"| through gateway | {med['gateway_seq'] * 1e3:.1f} | {med['gateway_conc']:.2f} |")
    print(f"| overhead | {(med['gateway_seq'] - med['direct_seq']) * 1e3:+.1f} ms "
          f"({med['gateway_seq'] / med['direct_seq'] - 1:+.0%}) | "
          f"{med['gateway_conc'] - med['direct_conc']:+.2f} s ({med['gateway_conc'] / med['direct_conc'] - 1:+.0%}) |")
    print(f"gateway process CPU per request (median): {med['gateway_cpu_ms']:.1f} ms")


if __name__ == "__main__":
    main()
