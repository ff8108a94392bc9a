"""The gateway's cost: the same requests straight to a vLLM engine and through `rollout-plugin serve` (run by hand).

    .venv/bin/python benchmarks/gateway_overhead.py [overhead] [--rounds 5] [--sequential 20] [--concurrent 64]
    .venv/bin/python benchmarks/gateway_overhead.py packing [--rounds 3] [--callers 64] [--pack-timeouts 0.01 0.05]
    .venv/bin/python benchmarks/gateway_overhead.py packing --rounds 1 --callers 8 --pack-timeouts 0.02   # smoke

One real CPU engine; the gateway is attached to it (engine.urls) in a subprocess, exactly as users
run it. Medians over rounds.

``overhead``: rounds alternate A (direct) and B (gateway):
- sequential: one request at a time, latency per request (what a single caller pays);
- concurrent: N requests at once, wall time (what a batch caller pays).

``packing``: N callers at once, each one non-streamed completion of its own prompt, through gateways
that differ only in how they send them: ``pass-through`` (``pack_callers=false``: one engine call per
caller) and ``packed <T>`` per pack timeout T (``pool.pack_timeout_s=T``: the pool holds a small pack
up to T for other callers' prompts, then sends them as one multi-prompt call). Each round runs every
gateway once, in a rotated order. Reported: wall time of the N callers, the gateway's CPU and the
engine's API server's CPU per request (HTTP, tokenizing, answers: what fewer calls save; the engine
core's CPU is left out, it polls while idle), and the engine calls the N callers cost (the engine's
own http_requests_total).

CPU is read from /proc; it does not depend on how busy the rest of the machine is, unlike the wall
times on a shared box — the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.model.embedded import resolve_model
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports

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


def start_gateway(engine: EngineProcess, model: str, tmp: Path, name: str,
                  extra: list[str]) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"url-{name}"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "rollout_plugin.cli.main", "serve", f"engine.urls=[{engine.url}]",
         f"engine.api_key={engine.api_key}", f"engine.served_model_name={model}", "engine.max_model_len=512",
         "port=0", f"ready_file={ready}", "log_level=WARNING", *extra], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if gateway.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway {name} did not start")
        time.sleep(0.2)  # polling for the ready file
    return gateway, ready.read_text().strip()


def stop(gateways: list[subprocess.Popen]) -> None:
    for g in gateways:
        g.terminate()
    for g in gateways:
        g.wait(timeout=60)


def run_overhead(args, engine: EngineProcess, model: str, tmp: Path) -> None:
    gateway, url = start_gateway(engine, model, tmp, "overhead", [])
    try:
        res = asyncio.run(measure(engine.url.rstrip("/").removesuffix("/v1"), engine.api_key, url, model, args,
                                  gateway.pid))
    finally:
        stop([gateway])
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


async def engine_calls(http: httpx.AsyncClient, engine: EngineProcess) -> float:
    root = engine.url.rstrip("/").removesuffix("/v1")
    text = (await http.get(f"{root}/metrics", headers={"Authorization": f"Bearer {engine.api_key}"})).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^http_requests_total\{handler="/v1/completions".* ([\d.e+]+)$', text, re.M))


async def callers(http: httpx.AsyncClient, url: str, model: str, n: int, tag: int) -> float:
    """``n`` callers at once, each its own prompt (``tag`` keeps prompts apart between phases: no cache reuse)."""
    t0 = time.perf_counter()
    resps = await asyncio.gather(*(http.post(f"{url}/v1/completions", json={
        **BODY, "model": model, "prompt": f"Caller {tag}-{i} counts: 1 2 3"}) for i in range(n)))
    for r in resps:
        r.raise_for_status()
    return time.perf_counter() - t0


async def measure_packing(engine: EngineProcess, gateways: dict[str, tuple[int, str]], model: str,
                          args) -> dict[str, dict[str, list[float]]]:
    out = {name: {"wall_s": [], "gateway_cpu_ms": [], "engine_cpu_ms": [], "engine_calls": []} for name in gateways}
    names = list(gateways)
    tag = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1024)) as http:
        for name, (_, url) in gateways.items():  # every path warm (connections, prefix of BODY) before timing
            tag += 1
            await callers(http, url, model, args.callers, tag)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                pid, url = gateways[name]
                tag += 1
                g0, e0, c0 = cpu_s(pid), cpu_s(engine.proc.pid), await engine_calls(http, engine)
                wall = await callers(http, url, model, args.callers, tag)
                g1, e1, c1 = cpu_s(pid), cpu_s(engine.proc.pid), await engine_calls(http, engine)
                row = out[name]
                row["wall_s"].append(wall)
                row["gateway_cpu_ms"].append((g1 - g0) * 1e3 / args.callers)
                row["engine_cpu_ms"].append((e1 - e0) * 1e3 / args.callers)
                row["engine_calls"].append(c1 - c0)
            print(f"  round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def run_packing(args, engine: EngineProcess, model: str, tmp: Path) -> None:
    load0 = os.getloadavg()
    specs = {"pass-through": ["pack_callers=false"]}
    for t in args.pack_timeouts:
        specs[f"packed {t:g}s"] = ["pack_callers=true", f"pool.pack_timeout_s={t}", f"pool.pack_size={args.callers}"]
    procs: list[subprocess.Popen] = []
    gateways: dict[str, tuple[int, str]] = {}
    try:
        for i, (name, extra) in enumerate(specs.items()):
            proc, url = start_gateway(engine, model, tmp, f"g{i}", extra)
            procs.append(proc)
            gateways[name] = (proc.pid, url)
        res = asyncio.run(measure_packing(engine, gateways, model, args))
    finally:
        stop(procs)
    print(f"\n1 CPU engine, {args.callers} callers at once, max_tokens=16, one prompt each; medians of {args.rounds} "
          f"rounds (rotated order); load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"| gateway | wall for {args.callers} callers (s) | gateway CPU (ms/request) "
          f"| engine API server CPU (ms/request) | engine calls |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(res["pass-through"]["wall_s"])
    for name, row in res.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        gain = "" if name == "pass-through" else f" ({med['wall_s'] / base - 1:+.0%})"
        print(f"| {name} | {med['wall_s']:.2f}{gain} | {med['gateway_cpu_ms']:.2f} | {med['engine_cpu_ms']:.1f} "
              f"| {med['engine_calls']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=("overhead", "packing"), default="overhead")
    ap.add_argument("--rounds", type=int, default=None, help="default: 5 (overhead), 3 (packing)")
    ap.add_argument("--sequential", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--pack-timeouts", type=float, nargs="+", default=[0.01, 0.05])
    args = ap.parse_args()
    args.rounds = args.rounds or (5 if args.mode == "overhead" else 3)
    model = resolve_model("embedded:tiny-llama")
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    cfg = EngineConfig(model=model, max_model_len=512, cpu_kvcache_gb=1, log_dir=str(tmp), startup_timeout_s=1200)
    (port,) = reserve_ports(cfg.host, 0, 1)
    engine = EngineProcess(0, cfg, model=model, port=port, max_num_seqs=256, cpu_bind=None, log_dir=tmp)
    engine.start()
    try:
        asyncio.run(engine.wait_ready())
        (run_overhead if args.mode == "overhead" else run_packing)(args, engine, model, tmp)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
