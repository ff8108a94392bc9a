"""Does GRPO learn through the pool? The CPU recipe's reward per step, drawn as a PNG.

    .venv/bin/python benchmarks/trl_learning.py [--steps 30] [--route backend|rollout_func]
        [--png docs/trl_learning.png] [override ...]

Runs ``recipes/trl/cpu_tiny.yaml`` (the embedded tiny random Llama, a reward that favours one token)
exactly as ``rollout-plugin trl-grpo --recipe recipes/trl/cpu_tiny.yaml`` does, then plots the
reward and the pool's weight version per step. Not a test: it takes minutes on a shared 2-core box.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--route", default="backend", choices=["backend", "rollout_func"])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/trl/cpu_tiny.yaml"))
    ap.add_argument("--png", default=str(ROOT / "docs/trl_learning.png"))
    ap.add_argument("overrides", nargs="*", help="more trl-grpo overrides, e.g. engine.urls=[http://...]")
    opts = ap.parse_args()

    from rollout_plugin.adapters.trl.config import TrlGrpoConfig, register_trl_configs
    from rollout_plugin.adapters.trl.entry import train
    from rollout_plugin.cli.app import compose, configure_logging
    from rollout_plugin.cli.trl_grpo import _recipe

    register_trl_configs()
    overrides = _recipe(["--recipe", opts.recipe, f"trl.max_steps={opts.steps}", f"route={opts.route}",
                         *opts.overrides])
    cfg = compose("trl_grpo", overrides, TrlGrpoConfig)
    configure_logging("WARNING")
    t0 = time.monotonic()
    trainer = train(cfg)
    wall = time.monotonic() - t0
    rows = [r for r in trainer.state.log_history if "reward" in r]
    steps = [r["step"] for r in rows]
    reward = [r["reward"] for r in rows]
    versions = [r.get("rollout_pool/weight_version", float("nan")) for r in rows]
    sync_s = [r["rollout_pool/weight_sync_s"] for r in rows if "rollout_pool/weight_sync_s" in r]
    k = max(1, len(reward) // 6)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()} (shared)",
        "route": opts.route, "steps": len(rows), "wall_s": round(wall, 1),
        "reward_first": round(statistics.mean(reward[:k]), 4), "reward_last": round(statistics.mean(reward[-k:]), 4),
        "weight_sync_s_median": round(statistics.median(sync_s), 3) if sync_s else None,
        "rewards": [round(x, 4) for x in reward],
    }
    print(json.dumps(summary))
    _plot(steps, reward, versions, Path(opts.png), summary)
    return 0


def _plot(steps, reward, versions, png: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(steps, reward, marker="o", ms=3, label="mean reward (share of the favoured token)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.step(steps, versions, where="post", color="tab:gray", alpha=0.5, label="engine weight version")
    ax2.set_ylabel("weight version", color="tab:gray")
    ax.set_title(f"TRL GRPO through the rollout pool ({s['route']}), embedded tiny model on CPU\n"
                 f"reward {s['reward_first']:.3f} -> {s['reward_last']:.3f} in {s['steps']} steps, "
                 f"{s['wall_s']:.0f}s wall", fontsize=9)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
