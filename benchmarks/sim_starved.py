"""One KV-starved simulated engine: the adaptive controller vs fixed caps vs everything in flight (run by hand).

    .venv/bin/python benchmarks/sim_starved.py [--profile h100_llama8b] [--kv-tokens 32768 65536] \
        [--prompts 256] [--k 8] [--output-median 400] [--caps 32,64,128,256,512]

The simulator's counterpart of ``benchmarks/pool_efficiency.py starved`` (issue 13): one engine whose
KV cache holds far fewer sequences than the pool would send, a GRPO-shaped step larger than any cap
(``prompts`` × ``k`` samples, lognormal lengths), the real pool code on simulated time. The engine
model preempts as vLLM V1 does (recompute: a preempted sequence's prompt and generated tokens are
prefilled again when it is readmitted), so preemption costs what a re-prefill costs on the profile.

Contenders: the pool with ``controller=off`` at each fixed cap, everything in flight (the pool at a cap
of every sample: vLLM's own scheduler is the only guard), and the pool's defaults (adaptive
controller, preset caps, KV-based first estimate). Targets (issue 13): adaptive ≥ 0.95 × the best
fixed cap and ≥ 1.2 × everything in flight. The simulation is deterministic: one run per contender.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from dataclasses import replace
from datetime import date

from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.profile import load_profile
from rollout_plugin.sim.report import calibration_line
from rollout_plugin.sim.runner import RunResult, simulate
from rollout_plugin.sim.workload import build_sessions


def starved_config(args: argparse.Namespace) -> SimulateConfig:
    cfg = SimulateConfig()
    w = cfg.workload
    w.prompts_per_engine, w.prompts, w.k = None, args.prompts, args.k
    w.output_tokens_median, w.max_tokens = args.output_median, args.max_tokens
    cfg.fleet.profile = args.profile
    return cfg


def contenders(cfg: SimulateConfig, caps: list[int], samples: int) -> list[tuple[str, Policy, SimulateConfig]]:
    fixed = [(f"fixed {c}", Policy.pool_fixed, replace(cfg, pool=replace(cfg.pool, per_engine=c,
                                                                          over_concurrency_ratio=1.0)))
             for c in caps]
    everything = replace(cfg, pool=replace(cfg.pool, per_engine=samples, over_concurrency_ratio=1.0))
    return fixed + [("everything in flight", Policy.pool_fixed, everything), ("adaptive", Policy.pool, cfg)]


def run_kv(cfg: SimulateConfig, kv_tokens: int, caps: list[int]) -> dict[str, RunResult]:
    profile = replace(load_profile(cfg.fleet.profile), kv_tokens=kv_tokens)
    sessions = build_sessions(cfg.workload, cfg.workload.prompts)
    samples = cfg.workload.prompts * cfg.workload.k
    out = {}
    for label, policy, c in contenders(cfg, caps, samples):
        r = simulate(policy, 1, profile, c, sessions)
        out[label] = r
        print(f"  kv {kv_tokens:>7} {label:<22} {r.makespan_s:8.1f} s  {r.tokens_per_s:8,.0f} tok/s  "
              f"preemptions {r.preemptions:6d}  recomputed {r.recomputed_tokens / r.output_tokens:5.1%} of output  "
              f"cap changes {r.cap_changes}  (CPU {r.cpu_s:.1f} s)", flush=True)
    return out


def table(kv_tokens: int, results: dict[str, RunResult]) -> str:
    best = min((k for k in results if k.startswith("fixed")), key=lambda k: results[k].makespan_s)
    ref, allin = results[best].makespan_s, results["everything in flight"].makespan_s
    lines = [f"KV {kv_tokens:,} tokens; best fixed: {best}", "",
             "| contender | makespan (s) | tok/s | preemptions | re-prefilled ÷ output | vs best fixed | "
             "vs everything in flight |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r.makespan_s:.1f} | {r.tokens_per_s:,.0f} | {r.preemptions} | "
                     f"{r.recomputed_tokens / r.output_tokens:.2f} | {ref / r.makespan_s:.2f} | "
                     f"{allin / r.makespan_s:.2f} |")
    a = results["adaptive"].makespan_s
    lines += ["", f"adaptive ÷ best fixed = {ref / a:.2f} (target ≥ 0.95); adaptive ÷ everything in flight = "
                  f"{allin / a:.2f} (target ≥ 1.2); best fixed ÷ everything in flight = {allin / ref:.2f} "
                  f"(what any cap can buy here)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100_llama8b")
    ap.add_argument("--kv-tokens", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--output-median", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--caps", default="32,64,128,256,512")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    cfg = starved_config(args)
    caps = [int(c) for c in args.caps.split(",")]
    t0 = time.perf_counter()
    tables = [table(kv, run_kv(cfg, kv, caps)) for kv in args.kv_tokens]
    w = cfg.workload
    print(f"\n{date.today()} {platform.node()}: one engine, profile {args.profile} with its KV cut; "
          f"{w.prompts} prompts x k={w.k}, prompt median {w.prompt_tokens_median}, output median "
          f"{w.output_tokens_median} (lognormal sigma {w.output_tokens_sigma}, max {w.max_tokens}); "
          f"{calibration_line(load_profile(args.profile))}; "
          f"{time.perf_counter() - t0:.0f} s wall")
    for text in tables:
        print(f"\n{text}")


if __name__ == "__main__":
    main()
