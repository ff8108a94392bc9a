"""``rollout-plugin model [engine.python=…]``: build the embedded tiny model if missing; print its path."""

from __future__ import annotations

from rollout_plugin.cli.app import compose
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.config.schema import CollectConfig

HELP = CommandHelp(
    about="Builds the project's embedded tiny Llama (random weights, made locally on first use: no hub) if it is "
          "missing and prints its directory; any other engine.model is printed as it is. Reads collect's config, "
          "so engine.* overrides written for collect work here too.",
    examples=("rollout-plugin model", "rollout-plugin model engine.python=/opt/vllm-venv/bin/python"),
    config="collect", schema=CollectConfig, keys=("engine.model", "engine.python"))


def run(overrides: list[str]) -> int:
    from rollout_plugin.model.embedded import resolve_model

    cfg = compose("collect", overrides, CollectConfig)
    print(resolve_model(cfg.engine.model, cfg.engine.python))
    return 0
