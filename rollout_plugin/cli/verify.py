"""``rollout-plugin verify input=… output=… parallelism=50``: score deferred rollouts (config: hydra_conf/verify.yaml)."""

from __future__ import annotations

from rollout_plugin.cli import aio
from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.verify.job import VerifyJobConfig


def register_verify_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="verify_job_schema", node=VerifyJobConfig)


HELP = CommandHelp(
    about="Scores the rollouts `rollout-plugin collect verify=deferred` wrote (each row carries its example and "
          "prompt), up to `parallelism` verifications at once, appending each scored row as soon as it is done. "
          "Killed at any point, resume=true keeps every whole line, drops a torn last one and scores only the ids "
          "not yet written: no sample lost, none doubled.",
    examples=("rollout-plugin verify input=r.jsonl output=r.verified.jsonl parallelism=50",
              "rollout-plugin verify input=r.jsonl verify.verifier=my_pkg.rewards:score verify.executor=process "
              "resume=true"),
    config="verify", schema=VerifyJobConfig, register=register_verify_configs)


def run(overrides: list[str]) -> int:
    from rollout_plugin.verify.job import verify_file

    register_verify_configs()
    cfg = compose("verify", overrides, VerifyJobConfig)
    configure_logging(cfg.log_level)
    summary = aio.run(verify_file(cfg))
    print("\n".join(summary.lines()))
    return 0
