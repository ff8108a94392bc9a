"""Which provider launches this pool's engines: ``pool.backend`` picks processes on this machine or Ray actors.

Apart from :mod:`~rollout_plugin.pool.engines.provider` (the seam both backends implement, and the local
one) so that the Ray backend depends on the seam and nothing depends back on it; ``ray`` itself is
imported only when that backend starts engines.
"""

from __future__ import annotations

from rollout_plugin.config.schema import EngineConfig, PoolBackend, PoolConfig
from rollout_plugin.pool.engines.provider import EngineProvider, LocalEngines
from rollout_plugin.pool.engines.ray_backend import RayEngines

__all__ = ["make_provider"]


def make_provider(engine: EngineConfig, pool: PoolConfig) -> EngineProvider:
    """The provider ``pool.backend`` names, for ``engine``'s servers."""
    if pool.backend == PoolBackend.ray:
        return RayEngines(engine, pool.ray)
    return LocalEngines(engine)
