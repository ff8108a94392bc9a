"""``rollout-plugin verify input=… output=… parallelism=50``: score deferred rollouts (config: hydra_conf/verify.yaml)."""

from __future__ import annotations

import asyncio

from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.verify.job import VerifyJobConfig


def register_verify_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="verify_job_schema", node=VerifyJobConfig)


def run(overrides: list[str]) -> int:
    from rollout_plugin.verify.job import verify_file

    register_verify_configs()
    cfg = compose("verify", overrides, VerifyJobConfig)
    configure_logging(cfg.log_level)
    summary = asyncio.run(verify_file(cfg))
    print("\n".join(summary.lines()))
    return 0
