"""The Ray actor class verl instantiates from ``router_class: rollout_plugin.adapters.verl.actor.RolloutPoolRouter``.

verl wraps a plain class with a bare ``ray.remote`` (an async actor that runs at most 1000 calls at
once), but uses a :class:`ray.actor.ActorClass` as given — so the class is decorated here. Waiting
acquisitions (up to a whole step's ``train_batch_size × n``) each hold one of those slots; with only
1000, the releases that would free servers could not get in (a deadlock). The limit is set above the
router's own ``max_waiting``, so the router, not Ray's queue, bounds the wait. One event loop for all
methods (Ray gives each concurrency group its own loop and thread; the router's state is not shared
across loops). Imports ray: only verl, which has it, loads this module.
"""

from __future__ import annotations

import ray

from rollout_plugin.adapters.verl.router import PoolRouter

# Above the router's default max_waiting (32768) plus releases and status calls in flight.
MAX_CONCURRENT_CALLS = 65536

RolloutPoolRouter = ray.remote(num_cpus=0, max_concurrency=MAX_CONCURRENT_CALLS)(PoolRouter)
