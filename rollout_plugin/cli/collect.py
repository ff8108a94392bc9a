"""``rollout-plugin collect key=value …`` (config: hydra_conf/collect.yaml)."""

from __future__ import annotations

import asyncio

from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.config.schema import CollectConfig


def run(overrides: list[str]) -> int:
    from rollout_plugin.collect.job import collect

    cfg = compose("collect", overrides, CollectConfig)
    configure_logging(cfg.log_level)
    summary = asyncio.run(collect(cfg))
    print("\n".join(summary.lines()))
    return 1 if summary.failed_prompts else 0
