"""``rollout-plugin trl-grpo [--recipe FILE.yaml] key=value …`` (config: hydra_conf/trl_grpo.yaml).

A recipe is a YAML file of values over ``hydra_conf/trl_grpo.yaml`` (see recipes/trl/), read as
overrides; the command line's overrides win over it.
"""

from __future__ import annotations

from pathlib import Path

from rollout_plugin.adapters.trl.config import TrlGrpoConfig, register_trl_configs
from rollout_plugin.cli.app import compose, configure_logging
from rollout_plugin.cli.help import CommandHelp
from rollout_plugin.errors import ConfigError, ConfigProblem


def _value(v: object) -> str:
    """A YAML value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _leaves(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def recipe_overrides(path: Path) -> list[str]:
    """A recipe as overrides of ``trl_grpo``: ``override GROUP: NAME`` defaults, then every leaf value."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    out = []
    for entry in data.pop("defaults", []):
        if isinstance(entry, dict):
            for key, name in entry.items():
                if key.startswith("override "):
                    out.append(f"{key.split(' ', 1)[1]}={name}")
    return out + [f"++{key}={_value(value)}" for key, value in _leaves(data)]  # ++: set, or add to a dict


def _recipe(overrides: list[str]) -> list[str]:
    """``--recipe PATH`` / ``recipe=PATH`` becomes that file's overrides, then the command line's (which win)."""
    rest, recipe = [], None
    it = iter(overrides)
    for arg in it:
        if arg == "--recipe":
            recipe = next(it, None)
        elif arg.startswith(("--recipe=", "recipe=")):
            recipe = arg.split("=", 1)[1]
        elif arg.startswith("trl."):
            rest.append("++" + arg)  # trl: is a free dict of GRPOConfig fields; set or add
        else:
            rest.append(arg)
    if recipe is None:
        return rest
    path = Path(recipe).expanduser()
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        raise ConfigError(ConfigProblem("recipe", recipe, "no such YAML file", "recipe=recipes/trl/cpu_tiny.yaml"))
    given = {o.lstrip("+~").split("=", 1)[0] for o in rest}
    return [o for o in recipe_overrides(path) if o.lstrip("+").split("=", 1)[0] not in given] + rest


HELP = CommandHelp(
    about="Trains with TRL's GRPOTrainer while the pool generates: prompts from every rank go once per group of "
          "num_generations, weights are synced into the engines after each optimizer step, and rollout_pool/* "
          "metrics reach TRL's logs. trl: holds GRPOConfig keyword arguments (unknown ones reported with the "
          "nearest field); engine:/pool:/controller: configure the pool; trainer settings left open are filled from "
          "the planner. A recipe (--recipe FILE.yaml, see recipes/trl/) is read first; the command line wins.",
    examples=("rollout-plugin trl-grpo --recipe recipes/trl/cpu_tiny.yaml",
              "rollout-plugin trl-grpo --recipe recipes/trl/cpu_tiny.yaml route=rollout_func trl.max_steps=10"),
    config="trl_grpo", schema=TrlGrpoConfig, register=register_trl_configs,
    flags={"--recipe": ("FILE", "a recipe YAML (recipes/trl/) read before the overrides, which win")},
    prepare=_recipe)


def run(overrides: list[str]) -> int:
    from rollout_plugin.adapters.trl.entry import train

    overrides = _recipe(overrides)
    register_trl_configs()
    cfg = compose("trl_grpo", overrides, TrlGrpoConfig)
    configure_logging(cfg.log_level)
    trainer = train(cfg)
    last = next((row for row in reversed(trainer.state.log_history) if "reward" in row), {})
    print(f"trl-grpo: {trainer.state.global_step} steps; last reward {last.get('reward', float('nan')):.4f}; "
          f"weights at version {last.get('rollout_pool/weight_version', float('nan')):g}")
    return 0
