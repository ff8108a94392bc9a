"""Lets verl find ``+rollout_pool=…`` without a ``hydra.searchpath`` flag.

Hydra imports every module under the ``hydra_plugins`` namespace package at start-up and asks each
:class:`SearchPathPlugin` to extend the config search path. Ours appends this package's config groups
(``pkg://rollout_plugin.hydra_conf``) — after verl's own, so verl's groups always win a name clash —
and only for apps whose search path holds verl's trainer configs.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

OUR_CONFIGS = "pkg://rollout_plugin.hydra_conf"
VERL_MARKERS = ("verl.trainer.config", "verl/trainer/config")


class RolloutPoolSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        paths = [element.path or "" for element in search_path.get_path()]
        if OUR_CONFIGS in paths or not any(marker in path for path in paths for marker in VERL_MARKERS):
            return
        search_path.append(provider="rollout-plugin", path=OUR_CONFIGS)
