"""How many requests one verl server may hold: Xtuner's per-engine cap × the over-concurrency ratio (pure).

Where a request goes (group and session affinity, the imbalance gate) is the pool's own policy
(:func:`rollout_plugin.pool.policy.routing.pick_near`): the router runs on the pool's admission core.
"""

from __future__ import annotations

from typing import Optional

from rollout_plugin.pool import derive_limits

__all__ = ["server_cap"]


def server_cap(*, max_num_seqs: Optional[int], max_model_len: int, group_size: int, servers: int,
               ratio: float, per_engine: Optional[int] = None) -> int:
    """Requests one server may hold: Xtuner's per-engine cap × the over-concurrency ratio.

    The engine batches at most ``max_num_seqs``; a little more in flight keeps its queue non-empty
    (:func:`rollout_plugin.pool.policy.limits.derive_limits`). Never below one group.
    """
    limits = derive_limits(max_model_len=max_model_len, engines=max(1, servers), k=max(1, group_size),
                           ratio=ratio, per_engine=per_engine, max_num_seqs=max_num_seqs)
    return limits.engine_inflight
