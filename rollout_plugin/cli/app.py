"""Compose a Hydra config from ``key=value`` overrides and turn it into a typed dataclass.

Hydra's own errors are long and nested; here they become one line naming the bad key and the
nearest valid one. The CLI catches :class:`RolloutPluginError` and prints it without a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rollout_plugin.config.validate import dotted_keys, nearest_key
from rollout_plugin.errors import ConfigError, ConfigProblem

T = TypeVar("T")

CONFIG_MODULE = "rollout_plugin.hydra_conf"


def compose(config_name: str, overrides: list[str], schema: type[T]) -> T:
    """Compose ``hydra_conf/<config_name>.yaml`` with ``overrides`` into an instance of ``schema``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose_config(config_name, overrides, schema).cfg
    try:
        obj = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as exc:
        raise _friendly(exc, overrides, schema) from None
    return obj  # type: ignore[return-value]


@dataclass(frozen=True)
class Composed:
    """A composed config before it becomes a dataclass, with what Hydra chose on the way (``--cfg``, ``--help``)."""

    cfg: Any  # DictConfig, typed by the schema; no ``hydra:`` node
    choices: dict[str, str] = field(default_factory=dict)  # config group -> the option the defaults list picked
    groups: dict[str, list[str]] = field(default_factory=dict)  # config group -> every option on the search path
    search_path: list[str] = field(default_factory=list)  # "provider: path", in Hydra's lookup order


def compose_config(config_name: str, overrides: list[str], schema: type, *, choices: bool = False) -> Composed:
    """The composed DictConfig, unknown keys refused; with ``choices``, also the groups Hydra chose from."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from rollout_plugin.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    extra: dict[str, Any] = {}
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=choices)
            if choices:
                extra = _choices(cfg)
                with open_dict(cfg):
                    del cfg["hydra"]
        _reject_unknown(OmegaConf.to_container(cfg, resolve=False), schema, overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _friendly(exc, overrides, schema) from None
    return Composed(cfg, **extra)


def _choices(cfg: Any) -> dict[str, Any]:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()
    picked = {g: str(o) for g, o in cfg.hydra.runtime.choices.items() if not g.startswith("hydra")}
    groups = {g: [o for o in loader.get_group_options(g, results_filter=ObjectType.CONFIG)
                  if o != "schema" and not o.endswith("_schema")] for g in picked}
    path = [f"{e.provider}: {e.path}" for e in loader.get_search_path().get_path()]
    return {"choices": picked, "groups": groups, "search_path": path}


def _reject_unknown(tree: dict, schema: type, overrides: list[str]) -> None:
    """``+key=value`` slips past struct mode; refuse keys the schema does not have."""
    known = set(dotted_keys(schema))

    def walk(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and dotted not in known:
                out += walk(value, dotted + ".")
            elif dotted not in known:
                out.append(dotted)
        return out

    unknown = walk(tree, "")
    if unknown:
        raise ConfigError([
            ConfigProblem(k, next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == k),
                                  None), "unknown config key",
                          f"{near}=…" if (near := nearest_key(k, known)) else None)
            for k in unknown
        ])


def _friendly(exc: Exception, overrides: list[str], schema: type) -> ConfigError:
    # Hydra wraps the useful message ("could not be converted to Float", "expected one of …") in its cause.
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    text = " ".join(" ".join(str(e) for e in reversed(chain)).split())
    keys = dotted_keys(schema)
    missing = re.search(r"Key '([^']+)' (?:is )?not in struct|Could not override '([^']+)'|"
                        r"Could not append to config\. An item is already at '([^']+)'", text)
    full_key = re.search(r"full_key: ([\w.]+)", text)
    if missing or "not in struct" in text:
        key = full_key.group(1) if full_key else next((g for g in (missing.groups() if missing else ()) if g), "?")
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        near = nearest_key(key, keys)
        return ConfigError(ConfigProblem(key, value, "unknown config key",
                                         f"{near}=…" if near else None))
    if full_key:
        key = full_key.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), None)
        reason = text.split(" full_key")[0]
        return ConfigError(ConfigProblem(key, value, reason))
    return ConfigError(ConfigProblem("<overrides>", " ".join(overrides), text[:300]))


def configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP call drowns the state changes this project logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
