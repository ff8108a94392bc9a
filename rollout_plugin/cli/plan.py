"""``rollout-plugin plan model=… hardware=… workload.n=8 emit=table|verl|trl|vllm|pool|all``.

Composes ``hydra_conf/plan.yaml``, reads ``model.path``'s config.json when given, calls the pure
planner and prints what was asked for. No tuning logic here.
"""

from __future__ import annotations

import logging
import shlex
import sys

from rollout_plugin.cli.app import compose
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.errors import ConfigError, ConfigProblem
from rollout_plugin.tuning import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    load_hf_config,
    make_plan,
    pool_yaml,
    table,
    to_specs,
    trl_yaml,
    verl_command,
    vllm_args,
    vllm_env,
)
from rollout_plugin.tuning.config import PlanConfig, _near, register_plan_configs

log = logging.getLogger(__name__)


def _check_groups(overrides: list[str]) -> None:
    """Unknown ``model=``/``hardware=`` names, reported with the nearest preset before Hydra's long error."""
    problems = []
    for o in overrides:
        key, _, value = o.partition("=")
        for group, presets in (("model", MODEL_PRESETS), ("hardware", HARDWARE_PRESETS)):
            if key == group and value not in presets:
                problems.append(ConfigProblem(group, value, f"unknown preset; known: {', '.join(presets)}",
                                              f"{group}={_near(value, presets)}"))
    if problems:
        raise ConfigError(problems)


def _prepare(overrides: list[str]) -> list[str]:
    _check_groups(overrides)
    return overrides


HELP = CommandHelp(
    about="Turns one spec -- a model (a preset, or model.path: an HF directory or its config.json), the hardware "
          "and the RL workload -- into settings for vLLM, the pool, verl and TRL, each with the reason it was "
          "chosen. Runs anywhere: no GPU, torch or trainer needed. Inconsistent input is refused with one line per "
          "problem, each naming the key and the nearest valid value. pin.* fixes a value and plans the rest around "
          "it; emit= picks the output (table, verl overrides, TRL GRPOConfig, vllm serve arguments, pool config).",
    examples=("rollout-plugin plan model=qwen2.5-7b hardware=h100-80 hardware.gpus_per_node=8 workload.n=8",
              "rollout-plugin plan model.path=/models/my-model/config.json workload.max_response_length=4096 "
              "emit=verl"),
    config="plan", schema=PlanConfig, register=register_plan_configs, prepare=_prepare)


def run(overrides: list[str]) -> int:
    _check_groups(overrides)
    register_plan_configs()
    cfg = compose("plan", overrides, PlanConfig)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    loaded = load_hf_config(cfg.model.path, dtype=cfg.model.dtype) if cfg.model.path else None
    plan = make_plan(*to_specs(cfg, loaded))
    emit = cfg.emit.value
    sections: list[tuple[str, str]] = []
    if emit in ("table", "all"):
        sections.append(("settings", table(plan)))
    if emit in ("verl", "all"):
        sections.append(("verl overrides", verl_command(plan)))
    if emit in ("trl", "all"):
        text = trl_yaml(plan)
        sections.append(("TRL GRPOConfig (YAML; the same keys are GRPOConfig(**kwargs))",
                         text.rstrip() if text is not None else "# " + "; ".join(plan.notes)))
    if emit in ("vllm", "all"):
        env = " ".join(f"{k}={v}" for k, v in vllm_env(plan).items())
        line = shlex.join(["vllm", "serve", *vllm_args(plan)])
        sections.append((f"vLLM server (one per engine, {plan.engine.engines} engines)",
                         f"{env} {line}" if env else line))
    if emit in ("pool", "all"):
        sections.append(("rollout-plugin engine/pool config", pool_yaml(plan).rstrip()))
    for i, (title, body) in enumerate(sections):
        if emit == "all":
            print(f"{'' if i == 0 else chr(10)}## {title}")
        print(body)
    sys.stdout.flush()
    return 0
