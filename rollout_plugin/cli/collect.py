"""``rollout-plugin collect key=value …`` (config: hydra_conf/collect.yaml)."""

from __future__ import annotations

import asyncio
import logging

from rollout_plugin.cli.app import compose
from rollout_plugin.config.schema import CollectConfig


def run(overrides: list[str]) -> int:
    from rollout_plugin.collect.job import collect

    cfg = compose("collect", overrides, CollectConfig)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = asyncio.run(collect(cfg))
    print("\n".join(summary.lines()))
    return 1 if summary.failed_prompts else 0
