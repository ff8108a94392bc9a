"""``rollout-plugin serve [pool.engines=2 port=8000]``: the pool behind one OpenAI endpoint (hydra_conf/serve.yaml)."""

from __future__ import annotations

from rollout_plugin.cli import aio
from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.gateway.server import ServeConfig


def register_serve_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


HELP = CommandHelp(
    about="Serves the pool as one OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions, /v1/models, "
          "/health, /metrics, plus admin and vLLM dev routes) so TRL's VLLMClient, NeMo Gym, Xtuner or curl use "
          "the pool unchanged: every call goes through its admission, per-engine caps, adaptive controller and "
          "failover. Launches pool.engines engines (or attaches to engine.urls); bound to 127.0.0.1 unless host is "
          "set, and then api_key is required.",
    examples=("rollout-plugin serve pool.engines=2 port=8000",
              "rollout-plugin serve engine.urls=[http://gpu1:8000,http://gpu2:8000] host=0.0.0.0 api_key=SECRET"),
    config="serve", schema=ServeConfig, register=register_serve_configs)


def run(overrides: list[str]) -> int:
    from rollout_plugin.gateway.server import serve

    register_serve_configs()
    cfg = compose("serve", overrides, ServeConfig)
    configure_logging(cfg.log_level)
    aio.run(serve(cfg))
    return 0
