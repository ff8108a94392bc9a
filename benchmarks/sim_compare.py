"""Simulated policy comparison at 64 / 256 / 1,024 engines, healthy and degraded (run by hand).

    .venv/bin/python benchmarks/sim_compare.py [--engines 64 256 1024] [--profile h100_llama8b] \
        [--prompts-per-engine 64] [--plot docs/sim_scaling.png]

One GRPO step per run (``prompts-per-engine × engines`` prompts × k=8, lognormal lengths), on
simulated time, through the real pool code. Scenarios: healthy; 10 % stragglers at 3× step time;
5 % of engines dying 5 simulated seconds in. Contenders: the pool with its default caps, the pool
with ``pool.per_engine=256`` (the backlog stays in the pool, where routing can still move it), the
pool with the controller off, and the three baselines of ``benchmarks/heterogeneous.py`` (static
split, verl's least-in-flight-by-count, distllm's fixed batches). Prints one markdown table per
scenario; the plot shows the straggler scenario.
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
from rollout_plugin.sim.report import calibration_line, plot_scaling
from rollout_plugin.sim.runner import RunResult, simulate
from rollout_plugin.sim.workload import build_sessions

CONTENDERS = [("pool", Policy.pool, None), ("pool per_engine=256", Policy.pool, 256),
              ("pool, controller off", Policy.pool_fixed, None), ("static", Policy.static, None),
              ("verl", Policy.verl, None), ("distllm", Policy.distllm, None)]


def scenarios(base: SimulateConfig) -> dict[str, SimulateConfig]:
    stragglers = replace(base, fleet=replace(base.fleet, straggler_fraction=0.10, straggler_slowdown=3.0))
    failures = replace(base, fleet=replace(base.fleet, failure_fraction=0.05, failure_at_s=5.0))
    return {"healthy": base, "10% stragglers (3x slower)": stragglers, "5% engines fail at t=5 s": failures}


def run(cfg: SimulateConfig, n: int, profile) -> list[RunResult]:
    sessions = build_sessions(cfg.workload, cfg.workload.prompts_per_engine * n)
    out = []
    for label, policy, per_engine in CONTENDERS:
        c = replace(cfg, pool=replace(cfg.pool, per_engine=per_engine)) if per_engine else cfg
        r = replace(simulate(policy, n, profile, c, sessions), policy=label)
        print(f"    {n:>5} {label:<22} makespan {r.makespan_s:7.1f} s  {r.tokens_per_s:>12,.0f} tok/s  "
              f"failed {r.failed}  (CPU {r.cpu_s:.1f} s, wall {r.wall_s:.1f} s)", flush=True)
        out.append(r)
    return out


def table(results: list[RunResult]) -> str:
    lines = ["| engines | contender | makespan (s) | output tok/s | slower than pool | preemptions | failed req |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    pool = {r.engines: r.makespan_s for r in results if r.policy == "pool"}
    for r in results:
        lines.append(f"| {r.engines} | {r.policy} | {r.makespan_s:.1f} | {r.tokens_per_s:,.0f} | "
                     f"{r.makespan_s / pool[r.engines]:.2f}x | {r.preemptions} | {r.failed} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--profile", default="h100_llama8b")
    ap.add_argument("--prompts-per-engine", type=int, default=64)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the pool logs each simulated failed call at WARNING
    profile = load_profile(args.profile)
    base = SimulateConfig()
    base.fleet.profile = args.profile
    base.workload.prompts_per_engine = args.prompts_per_engine
    t0 = time.perf_counter()
    tables, plotted = {}, []
    for name, cfg in scenarios(base).items():
        print(f"scenario: {name}", flush=True)
        results = [r for n in args.engines for r in run(cfg, n, profile)]
        tables[name] = table(results)
        if name.startswith("10%"):
            plotted = results
    w = base.workload
    print(f"\n{date.today()} {platform.node()}: {args.prompts_per_engine} prompts per engine x k={w.k}, "
          f"prompt median {w.prompt_tokens_median}, output median {w.output_tokens_median} "
          f"(lognormal sigma {w.output_tokens_sigma}, max {w.max_tokens}); {calibration_line(profile)}; "
          f"whole sweep {time.perf_counter() - t0:.0f} s wall")
    for name, text in tables.items():
        print(f"\n**{name}**\n\n{text}")
    if args.plot and plotted:
        plot_scaling(plotted, args.plot,
                     f"simulated GRPO step, {args.prompts_per_engine} prompts/engine x k={w.k}, 10% stragglers "
                     f"(3x), profile {profile.name}\n{calibration_line(profile)}")
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
