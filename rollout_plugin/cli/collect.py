"""``rollout-plugin collect key=value …`` (config: hydra_conf/collect.yaml)."""

from __future__ import annotations

from rollout_plugin.cli import aio
from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.config.schema import CollectConfig

HELP = CommandHelp(
    about="Generates rollouts for a JSONL of prompts (one {\"id\", \"prompt\" | \"messages\" | \"prompt_token_ids\"} "
          "a line; other fields, e.g. answer, go to the verifier) on vLLM engines it launches (pool.engines) or "
          "attaches to (engine.urls), scores each sample beside generation (or later: verify=deferred), and writes "
          "one JSONL line per sample, <output>.summary.json and <output>.timeline.jsonl. With no arguments: the "
          "~200 arithmetic prompts shipped in the package, on the embedded tiny model. Bad input fails in one line "
          "before any engine starts.",
    examples=("rollout-plugin collect pool.engines=2 pool.k=4",
              "rollout-plugin collect input=my.jsonl output=out.jsonl engine.urls=[http://gpu-node:8000] "
              "verify=deferred"),
    config="collect", schema=CollectConfig)


def run(overrides: list[str]) -> int:
    from rollout_plugin.collect.job import collect

    cfg = compose("collect", overrides, CollectConfig)
    configure_logging(cfg.log_level)
    summary = aio.run(collect(cfg))
    print("\n".join(summary.lines()))
    return 1 if summary.failed_prompts else 0
