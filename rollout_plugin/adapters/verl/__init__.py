"""verl adapter: config groups, resolvers, a concurrency-managed router and a before-launch check.

``pip install rollout-plugin[verl]``, then add ``+rollout_pool=pool`` to ``python -m verl.trainer.main_ppo``:

- ``hydra_conf/rollout_pool/`` holds the groups (found through the ``hydra_plugins`` search-path plugin);
- :mod:`.plugin` is the ``verl.plugins`` entry point that registers the resolvers (:mod:`.resolvers`);
- :mod:`.router` (wrapped as a Ray actor in :mod:`.actor`) is the ``router_class`` verl builds;
- :mod:`.check` is ``rollout-plugin verl-check``.

Nothing here imports verl, ray or torch at import time; :mod:`.actor` and :mod:`.check` do, when used.
"""

from typing import Any

__all__ = ["plan_for", "register", "server_cap", "specs_from_verl"]


def __getattr__(name: str) -> Any:
    # Lazy: verl imports .plugin through this package, and a failure in the resolvers' imports must reach the
    # plugin (which turns it into a resolver error naming it) instead of failing the package silently in verl.
    if name == "server_cap":
        from rollout_plugin.adapters.verl.admission import server_cap

        return server_cap
    if name in ("plan_for", "register", "specs_from_verl"):
        from rollout_plugin.adapters.verl import resolvers

        return getattr(resolvers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
