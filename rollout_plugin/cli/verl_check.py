"""``rollout-plugin verl-check <the overrides you give verl>``: every config problem, before any GPU is touched.

    rollout-plugin verl-check +rollout_pool=pool actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct \\
        data.train_batch_size=256 actor_rollout_ref.rollout.n=8 trainer.n_gpus_per_node=8

Needs verl installed (``pip install rollout-plugin[verl]``). Prints each problem on its own line
(key, value, why, what would be valid) and exits 1, or the values the job will run with and exits 0.
"""

from __future__ import annotations

import sys
import textwrap
from importlib import resources

from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.config.describe import KeyDoc, Section, describe, yaml_key_docs
from rollout_plugin.errors import InputError

GROUPS = ("tuned", "pool", "long_context")  # hydra_conf/rollout_pool/<name>.yaml, each on top of the one before
DEFAULT = "pool"  # verl-check adds +rollout_pool=pool when no group is named (adapters/verl/check.py)
NAMESPACE = "rollout_pool"


def _group_text(name: str) -> str:
    return (resources.files(f"rollout_plugin.hydra_conf.{NAMESPACE}") / f"{name}.yaml").read_text()


def _group_lines() -> list[str]:
    """``+rollout_pool=<group>`` and what it does: the group file's own header comment."""
    out = []
    for name in GROUPS:
        header = []
        for line in _group_text(name).splitlines()[2:]:  # after "# @package" and the command line
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        about = " ".join(" ".join(header).split()) + (" (the default)" if name == DEFAULT else "")
        out += textwrap.wrap(f"+{NAMESPACE}={name}: {about}", 110, initial_indent="  ", subsequent_indent="      ")
    return out


def _sections() -> list[Section]:
    """rollout_pool.* keys: the groups' own YAML (values, comments), the router's settings from its dataclass."""
    from rollout_plugin.adapters.verl.router import RouterSettings

    chosen: dict[str, tuple[str, str]] = {}  # the default group and those under it
    for name in GROUPS[: GROUPS.index(DEFAULT) + 1]:
        chosen.update(_yaml_keys(name))
    for name in GROUPS[GROUPS.index(DEFAULT) + 1:]:  # keys only a later group sets: say which
        chosen.update({k: (v, f"(+{NAMESPACE}={name}) {doc}".strip()) for k, (v, doc) in _yaml_keys(name).items()
                       if k not in chosen})
    router_prefix = f"{NAMESPACE}.router."
    own = Section(NAMESPACE, "planner inputs (the rollout_pool groups' YAML)", tuple(
        KeyDoc(k, _yaml_type(v), v, doc) for k, (v, doc) in chosen.items() if not k.startswith(router_prefix)))
    router = [Section(s.prefix, s.title, tuple(
        KeyDoc(k.key, k.type, chosen.get(k.key, (k.default, ""))[0], k.doc or chosen.get(k.key, ("", ""))[1])
        for k in s.keys)) for s in describe(RouterSettings, router_prefix)]
    return [own, *router]


def _yaml_keys(name: str) -> dict[str, tuple[str, str]]:
    return {k: v for k, v in yaml_key_docs(_group_text(name)).items() if k.startswith(NAMESPACE + ".")}


def _yaml_type(value: str) -> str:
    import yaml

    parsed = yaml.safe_load(value)
    return "str|null" if parsed is None else type(parsed).__name__


def _cfg_yaml(overrides: list[str], resolve: bool) -> str:
    """verl's composed ppo_trainer config with our group, as verl would run it (needs verl)."""
    _import_verl()
    from omegaconf import OmegaConf

    from rollout_plugin.adapters.verl.check import compose_verl, with_our_group
    from rollout_plugin.errors import RolloutPluginError

    try:
        return OmegaConf.to_yaml(compose_verl(with_our_group(overrides)), resolve=resolve)
    except RolloutPluginError:
        raise
    except Exception as exc:  # Hydra's and OmegaConf's errors: one line, as verl-check reports them
        raise InputError(" ".join(f"{type(exc).__name__}: {exc}".split())[:500]) from None


HELP = CommandHelp(
    about="Checks a verl command line -- the overrides you would give `python -m verl.trainer.main_ppo` -- without "
          "a GPU: verl's ppo_trainer config is composed with our rollout_pool group (+rollout_pool=pool unless you "
          "name one), the planner runs on the job's shape, every value is resolved, and our cross-checks and "
          "verl's own validate_config run. Every problem is printed on its own line (key, value, why, what would "
          "be valid) and the exit code is 1; or the values the job will run with, and 0. Needs verl installed "
          "(pip install 'rollout-plugin[verl]'). Any key you set wins; the planner plans the rest around it.",
    examples=("rollout-plugin verl-check +rollout_pool=pool actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct "
              "data.train_batch_size=256 actor_rollout_ref.rollout.n=8 trainer.n_gpus_per_node=8",
              'LAUNCH="rollout-plugin verl-check" bash recipes/verl/grpo_gsm8k_qwen2.5_7b.sh'),
    sections=_sections, groups=_group_lines, cfg_yaml=_cfg_yaml)


def _import_verl() -> None:
    try:
        import verl  # noqa: F401  (loads our verl.plugins entry point)
    except ImportError as exc:
        raise InputError(f"verl is not importable here ({exc}); pip install 'rollout-plugin[verl]'") from None


def run(overrides: list[str]) -> int:
    _import_verl()
    from rollout_plugin.adapters.verl.check import check, summary

    report = check(overrides)
    command = "python -m verl.trainer.main_ppo " + " ".join(report.overrides)
    if not report.ok:
        print(f"verl-check: {len(report.problems)} problem(s) in: {command}", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"verl-check: ok: {command}")
    print(summary(report))
    return 0
