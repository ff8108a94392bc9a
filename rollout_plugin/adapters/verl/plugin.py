"""The ``verl.plugins`` entry point: ``import verl`` imports this module in the driver and every Ray worker.

It registers our OmegaConf resolvers (the ``rollout_pool`` groups resolve wherever verl resolves its
config) and our Hydra search-path plugin. A wheel install also ships that plugin under the
``hydra_plugins`` namespace package, where Hydra finds it by scanning; an editable install maps
packages through an import hook that Hydra's directory scan cannot see, so registering it here makes
both work. No verl, ray or torch import.

verl logs a plugin that fails to import at DEBUG level and goes on: the user would see only an
unresolved ``${rollout_pool.tuned:…}``. So an import failure here registers stand-in resolvers that
raise it — the first ``rollout_pool`` value verl resolves names the import error and the fix.
"""

import logging

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# The resolvers rollout_plugin.adapters.verl.resolvers.register() registers (tests check the two lists agree).
RESOLVERS = ("rollout_pool.tuned", "rollout_pool.router_yaml")


def _broken(exc: BaseException) -> None:
    why = (f"rollout-plugin's verl plugin (rollout_plugin.adapters.verl.plugin) failed to import: "
           f"{type(exc).__name__}: {exc}. Fix: install rollout-plugin into verl's environment with its extra "
           f"(pip install 'rollout-plugin[verl]', or pip install -e '.[verl]' in a checkout); "
           f"`python -c 'import rollout_plugin.adapters.verl.plugin'` shows the whole traceback")

    def fail(*_: object) -> None:
        raise ImportError(why)

    for name in RESOLVERS:
        OmegaConf.register_new_resolver(name, fail, replace=True)
    log.error("%s", why)


try:  # first and alone: without it `+rollout_pool=pool` is not found at all (an editable install)
    from hydra.core.plugins import Plugins

    from hydra_plugins.rollout_plugin.searchpath import RolloutPoolSearchPathPlugin

    Plugins.instance().register(RolloutPoolSearchPathPlugin)
except Exception as exc:  # Hydra then says the group is missing; say why here too
    log.error("rollout-plugin's Hydra search-path plugin failed to register (%s: %s): +rollout_pool=… will not be "
              "found; pip install 'rollout-plugin[verl]' into verl's environment", type(exc).__name__, exc)

try:
    from rollout_plugin.adapters.verl.resolvers import register

    register()
except Exception as exc:  # verl would swallow it: make every rollout_pool value say it instead
    _broken(exc)
