"""What ``simulate`` answers: a sweep of (engines × policies), its table, its JSON and its plot.

matplotlib is imported lazily and only through its object API (Figure + Agg canvas), like
:mod:`rollout_plugin.viz`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from rollout_plugin.errors import RolloutPluginError
from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.profile import EngineProfile
from rollout_plugin.sim.runner import RunResult, simulate

log = logging.getLogger(__name__)


def sweep(cfg: SimulateConfig, profile: EngineProfile,
          on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    out = []
    for n in cfg.fleet.engines:
        for policy in cfg.policies:
            result = simulate(Policy(policy), n, profile, cfg)
            out.append(result)
            if on_result is not None:
                on_result(result)
    return out


def calibration_line(profile: EngineProfile) -> str:
    cal = profile.calibration
    parts = []
    if cal.get("holdout", {}).get("points"):
        h = cal["holdout"]
        parts.append(f"makespan error on {h['points']} held-out measured points: median {h['median_abs_pct']}%, "
                     f"max {h['max_abs_pct']}%")
    if cal.get("published", {}).get("points"):
        p = cal["published"]
        parts.append(f"error against {p['points']} published figures: median {p['median_abs_pct']}%, "
                     f"max {p['max_abs_pct']}%")
    return f"profile {profile.name}: " + ("; ".join(parts) if parts else "no calibration error recorded")


def table(results: Sequence[RunResult]) -> str:
    lines = ["| engines | policy | makespan (s) | tokens/s | vs pool | busy | preemptions | failed | wall (s) "
             "| CPU (s) | prefix-cache hit rate |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pool = {r.engines: r.makespan_s for r in results if r.policy == Policy.pool.value}
    for r in results:
        rel = f"{r.makespan_s / pool[r.engines]:.2f}x" if r.engines in pool else "-"
        hit = "-" if r.prefix_cache_hit_rate is None else f"{r.prefix_cache_hit_rate:.1%}"
        lines.append(f"| {r.engines} | {r.policy} | {r.makespan_s:.1f} | {r.tokens_per_s:,.0f} | {rel} | "
                     f"{r.engine_busy:.0%} | {r.preemptions} | {r.failed} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {hit} |")
    return "\n".join(lines)


def run_table(results: Sequence[RunResult]) -> str:
    """Multi-step runs (workload.steps > 1): what reached the trainer, against the best sync baseline."""
    lines = ["| engines | policy | run (s) | useful tok/s | vs sync | wasted | max staleness | mean trained tokens "
             "| busy |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    sync = {}
    for r in results:
        if r.policy not in (Policy.pool.value, Policy.pool_fixed.value):
            sync[r.engines] = max(sync.get(r.engines, 0.0), r.useful_tokens_per_s)
    for r in results:
        rel = f"{r.useful_tokens_per_s / sync[r.engines]:.2f}x" if sync.get(r.engines) else "-"
        waste = f"{r.wasted_tokens / r.useful_tokens:.1%}" if r.useful_tokens else "-"
        lines.append(f"| {r.engines} | {r.policy} | {r.makespan_s:.1f} | {r.useful_tokens_per_s:,.0f} | {rel} | "
                     f"{waste} | {r.max_staleness_seen} | {r.mean_trained_output_tokens:.1f} | {r.engine_busy:.0%} |")
    return "\n".join(lines)


def write_json(results: Sequence[RunResult], path: str | Path, meta: dict) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "runs": [r.row() for r in results]}, indent=1) + "\n")


def plot_scaling(results: Sequence[RunResult], path: str | Path, title: str, dpi: int = 110) -> None:
    """Two panels against engines (log x): tokens/s per engine, and makespan; one line per policy."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RolloutPluginError("plot=…: needs matplotlib (pip install 'rollout-plugin[plot]')") from None
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    # Policies that behave alike draw on top of each other: distinct markers and dashes keep both visible.
    markers, dashes = "osD^vx", ("-", "--", ":", "-.")
    for i, policy in enumerate(dict.fromkeys(r.policy for r in results)):
        rs = sorted((r for r in results if r.policy == policy), key=lambda r: r.engines)
        xs = [r.engines for r in rs]
        style = {"marker": markers[i % len(markers)], "linestyle": dashes[i % len(dashes)], "markersize": 7 - i % 3,
                 "linewidth": 2.2 if policy == Policy.pool.value else 1.3}
        ax1.plot(xs, [r.tokens_per_s / r.engines for r in rs], label=policy, **style)
        ax2.plot(xs, [r.makespan_s for r in rs], label=policy, **style)
    engines = sorted({r.engines for r in results})
    for ax, ylabel in ((ax1, "output tokens/s per engine"), (ax2, "step makespan (simulated s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(engines, [str(n) for n in engines])
        ax.minorticks_off()
        ax.set_xlabel("engines")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=dpi)
