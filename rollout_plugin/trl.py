"""User-facing import path for the TRL adapter: ``from rollout_plugin.trl import attach, RolloutPoolCallback``.

A thin re-export of :mod:`rollout_plugin.adapters.trl`; TRL is imported on first use of a name.
"""

from rollout_plugin.adapters.trl import __all__, __getattr__  # noqa: F401
