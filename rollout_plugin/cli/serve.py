"""``rollout-plugin serve [pool.engines=2 port=8000]``: the pool behind one OpenAI endpoint (hydra_conf/serve.yaml)."""

from __future__ import annotations

import asyncio

from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.gateway.server import ServeConfig


def register_serve_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def run(overrides: list[str]) -> int:
    from rollout_plugin.gateway.server import serve

    register_serve_configs()
    cfg = compose("serve", overrides, ServeConfig)
    configure_logging(cfg.log_level)
    asyncio.run(serve(cfg))
    return 0
