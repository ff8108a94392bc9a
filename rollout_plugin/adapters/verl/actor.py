"""The Ray actor class verl instantiates from ``router_class: rollout_plugin.adapters.verl.actor.RolloutPoolRouter``.

verl wraps a plain class with a bare ``ray.remote`` (an async actor: 1000 concurrent calls), but uses
an :class:`ray.actor.ActorClass` as given — so the class is decorated here. Waiting acquisitions
(up to a whole step's ``train_batch_size × n``) get their own concurrency group, so they can never
occupy the slots that releases, status calls and cap updates need (that would deadlock the step).
Imports ray: only verl (which has it) loads this module.
"""

from __future__ import annotations

from typing import Any

import ray

from rollout_plugin.adapters.verl.router import PoolRouter

# Above the router's default max_waiting (32768): the router, not Ray's queue, refuses the excess.
ADMISSION_SLOTS = 65536


class _PoolRouterActor(PoolRouter):
    @ray.method(concurrency_group="admission")
    async def acquire_server(self, request_id: str, prompt_ids: Any = None, **extra: Any) -> tuple[str, Any]:
        return await super().acquire_server(request_id, prompt_ids, **extra)


RolloutPoolRouter = ray.remote(num_cpus=0, concurrency_groups={"admission": ADMISSION_SLOTS})(_PoolRouterActor)
