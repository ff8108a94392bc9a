"""``rollout-plugin simulate fleet.engines=[64,256,1024] fleet.straggler_fraction=0.1``: fleet simulator.

Composes ``hydra_conf/simulate.yaml``, checks it, runs :func:`rollout_plugin.sim.report.sweep`
(every policy at every fleet size on virtual time) and prints the table with the profile's
calibration error. No simulation logic here.
"""

from __future__ import annotations

import logging
import platform
from datetime import date

from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.config.validate import Problems
from rollout_plugin.sim.config import SimulateConfig, register_sim_configs
from rollout_plugin.sim.profile import load_profile
from rollout_plugin.sim.report import (
    calibration_line,
    plot_scaling,
    run_table,
    sweep,
    table,
    write_json,
)

log = logging.getLogger(__name__)


HELP = CommandHelp(
    about="Runs the real pool code (dispatcher, routing, adaptive controller, monitor, failover) over simulated "
          "vLLM engines on a simulated clock, for every policy in `policies` at every fleet size in "
          "fleet.engines, and prints makespan and tokens/s for each, with the step-time profile's calibration "
          "error. A GRPO step on 1,024 engines takes seconds of CPU. Use it to compare policies and find where a "
          "fleet's step time goes, not to predict a GPU run's seconds.",
    examples=("rollout-plugin simulate fleet.engines=[64,256,1024] fleet.straggler_fraction=0.1 plot=scaling.png",
              "rollout-plugin simulate fleet.profile=cpu_tiny fleet.failure_fraction=0.05 workload.turns=4 "
              "policies=[pool,static]",
              "rollout-plugin simulate fleet.engines=[64] workload.steps=8 workload.train_s=50 "
              "workload.output_tokens_sigma=1.0 workload.max_tokens=16384 fleet.max_model_len=18432 output=run.json"),
    config="simulate", schema=SimulateConfig, register=register_sim_configs)


def check(cfg: SimulateConfig) -> None:
    p = Problems()
    if not cfg.fleet.engines:
        p.add("fleet.engines", cfg.fleet.engines, "needs at least one fleet size", "[8,64]")
    for i, n in enumerate(cfg.fleet.engines):
        p.at_least(f"fleet.engines[{i}]", n, 1)
    p.in_range("fleet.straggler_fraction", cfg.fleet.straggler_fraction, 0.0, 1.0)
    p.at_least("fleet.straggler_slowdown", cfg.fleet.straggler_slowdown, 1.0)
    p.in_range("fleet.failure_fraction", cfg.fleet.failure_fraction, 0.0, 0.99)
    p.at_least("fleet.failure_at_s", cfg.fleet.failure_at_s, 0.0)
    w = cfg.workload
    p.at_least("workload.prompts", w.prompts, 1)
    p.at_least("workload.prompts_per_engine", w.prompts_per_engine, 1)
    p.at_least("workload.k", w.k, 1)
    p.at_least("workload.turns", w.turns, 1)
    p.at_least("workload.prompt_tokens_median", w.prompt_tokens_median, 1)
    p.at_least("workload.output_tokens_median", w.output_tokens_median, 1)
    p.at_least("workload.max_tokens", w.max_tokens, 1)
    p.at_least("workload.prompt_tokens_sigma", w.prompt_tokens_sigma, 0.0)
    p.at_least("workload.output_tokens_sigma", w.output_tokens_sigma, 0.0)
    p.at_least("workload.tool_latency_s", w.tool_latency_s, 0.0)
    p.at_least("workload.steps", w.steps, 1)
    p.at_least("workload.train_s", w.train_s, 0.0)
    p.at_least("workload.max_staleness", w.max_staleness, 0)
    modes = ("keep", "continue", "drain", "restart")
    if w.update_mode not in modes:
        p.add("workload.update_mode", w.update_mode, f"not a weight-update mode ({', '.join(modes)})", "continue")
    if w.steps > 1 and w.turns > 1:
        p.add("workload.turns", w.turns, "a multi-step run (workload.steps > 1) is single-turn", 1)
    p.at_least("baselines.distllm_batch", cfg.baselines.distllm_batch, 1)
    p.at_least("horizon_s", cfg.horizon_s, 1.0)
    if not cfg.policies:
        p.add("policies", cfg.policies, "needs at least one policy", "[pool,static]")
    p.raise_if_any()


def run(overrides: list[str]) -> int:
    register_sim_configs()
    cfg = compose("simulate", overrides, SimulateConfig)
    configure_logging(cfg.log_level)
    check(cfg)
    profile = load_profile(cfg.fleet.profile)
    w, f = cfg.workload, cfg.fleet
    size = f"{w.prompts_per_engine} prompts per engine" if w.prompts_per_engine else f"{w.prompts} prompts"
    title = (f"simulated: {size} x k={w.k}, {w.turns} turn(s), output median {w.output_tokens_median} "
             f"(sigma {w.output_tokens_sigma}); profile {profile.name}; stragglers {f.straggler_fraction:.0%} "
             f"x{f.straggler_slowdown:g}, failures {f.failure_fraction:.0%} at {f.failure_at_s:g}s")
    print(title)
    print(calibration_line(profile))

    def progress(r) -> None:
        print(f"  {r.engines:>5} engines {r.policy:<10} makespan {r.makespan_s:8.1f} s  "
              f"{r.tokens_per_s:>12,.0f} tok/s  (simulated in {r.wall_s:.1f} s, {r.cpu_s:.1f} s CPU)", flush=True)

    results = sweep(cfg, profile, progress)
    print()
    print(table(results))
    if w.steps > 1:
        print()
        print(f"{w.steps} steps, train_s={w.train_s:g}, pool updates mode={w.update_mode} "
              f"max_staleness={w.max_staleness}; wasted as a share of useful tokens")
        print(run_table(results))
    meta = {"title": title, "profile": profile.name, "calibration": profile.calibration,
            "date": str(date.today()), "machine": platform.node()}
    if cfg.output:
        write_json(results, cfg.output, meta)
        print(f"wrote {cfg.output}")
    if cfg.plot:
        plot_scaling(results, cfg.plot, title + "\n" + calibration_line(profile))
        print(f"wrote {cfg.plot}")
    return 0
