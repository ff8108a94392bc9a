"""``rollout-plugin plot timeline=run.timeline.jsonl output=run.png``: draw a pool timeline as a PNG.

Composes ``hydra_conf/plot.yaml``, loads the JSONL and calls :func:`rollout_plugin.viz.plot_timeline`.
No drawing logic here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rollout_plugin.cli.app import compose
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.viz import describe, load_timeline, plot_timeline

log = logging.getLogger(__name__)

DPI_RANGE = (50, 400)


@dataclass
class PlotConfig:
    timeline: Optional[str] = None  # the JSONL the pool wrote (controller.timeline; collect: <output>.timeline.jsonl)
    output: Optional[str] = None  # unset: the timeline's path with .png
    title: Optional[str] = None  # unset: the run's own title from the timeline's meta record
    dpi: int = 110  # the PNG's resolution, 50 to 400
    log_level: str = "WARNING"  # DEBUG, INFO, WARNING or ERROR


def register_plot_configs() -> None:
    """Register the plot schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="plot_schema", node=PlotConfig)


HELP = CommandHelp(
    about="Draws the timeline a pool run wrote (collect: <output>.timeline.jsonl; any pool: controller.timeline) "
          "as one PNG with a column per engine: in-flight and cap, KV-cache usage, tokens/s, health and cap "
          "changes. Needs matplotlib (the plot extra).",
    examples=("rollout-plugin plot timeline=rollouts.timeline.jsonl",
              "rollout-plugin plot timeline=run.timeline.jsonl output=run.png title=first-run dpi=200"),
    config="plot", schema=PlotConfig, register=register_plot_configs)


def _check(cfg: PlotConfig) -> None:
    problems = []
    if not cfg.timeline:
        problems.append(ConfigProblem("timeline", cfg.timeline, "required: the JSONL timeline a pool run wrote",
                                      "timeline=rollouts.timeline.jsonl"))
    low, high = DPI_RANGE
    if not low <= cfg.dpi <= high:
        problems.append(ConfigProblem("dpi", cfg.dpi, f"must be in [{low}, {high}]",
                                      f"dpi={min(max(cfg.dpi, low), high)}"))
    if problems:
        raise ConfigError(problems)


def run(overrides: list[str]) -> int:
    register_plot_configs()
    cfg = compose("plot", overrides, PlotConfig)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _check(cfg)
    timeline = Path(cfg.timeline)  # type: ignore[arg-type]
    output = Path(cfg.output) if cfg.output else timeline.with_suffix(".png")
    records = load_timeline(timeline)
    plot_timeline(records, output, title=cfg.title, dpi=cfg.dpi)
    print(f"wrote {output} ({describe(records)})")
    return 0
