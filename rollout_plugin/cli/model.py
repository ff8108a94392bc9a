"""``rollout-plugin model [engine.python=…]``: build the embedded tiny model if missing; print its path."""

from __future__ import annotations

from rollout_plugin.cli.app import compose
from rollout_plugin.config.schema import CollectConfig


def run(overrides: list[str]) -> int:
    from rollout_plugin.model.embedded import resolve_model

    cfg = compose("collect", overrides, CollectConfig)
    print(resolve_model(cfg.engine.model, cfg.engine.python))
    return 0
