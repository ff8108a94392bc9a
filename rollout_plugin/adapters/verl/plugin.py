"""The ``verl.plugins`` entry point: ``import verl`` imports this module in the driver and every Ray worker.

It registers our OmegaConf resolvers (the ``rollout_pool`` groups resolve wherever verl resolves its
config) and our Hydra search-path plugin. A wheel install also ships that plugin under the
``hydra_plugins`` namespace package, where Hydra finds it by scanning; an editable install maps
packages through an import hook that Hydra's directory scan cannot see, so registering it here makes
both work. No verl, ray or torch import.
"""

from hydra.core.plugins import Plugins

from hydra_plugins.rollout_plugin.searchpath import RolloutPoolSearchPathPlugin
from rollout_plugin.adapters.verl.resolvers import register

register()
Plugins.instance().register(RolloutPoolSearchPathPlugin)
