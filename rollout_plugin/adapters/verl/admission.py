"""Which verl server gets the next request, or none yet: pure policy over load snapshots (no Ray, no I/O).

verl sends every sample of a step at once; the router admits one only where a server has room under
its cap, and otherwise the request waits in the router's queue (see :mod:`.router`). The order of
preference, each among servers with room:

1. a multi-turn session's server (sticky: its prefix is cached there), unless that server is full —
   then the session moves rather than waits;
2. the GRPO group's server (the n samples share one prompt: one prefill, a shared prefix cache) —
   waiting for room there if need be — while it is no more than ``imbalance`` (a share of the cap,
   not counting the group's own samples) above the least-loaded server; past that the gate opens and
   the sample goes where the room is;
3. the least-loaded server by in-flight ÷ cap (:func:`rollout_plugin.pool.routing.pick_engine`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from rollout_plugin.pool.limits import derive_limits
from rollout_plugin.pool.routing import EngineLoad, pick_engine


@dataclass(frozen=True)
class ServerLoad:
    server_id: str
    inflight: int  # requests (samples) admitted and not yet released
    cap: int  # requests allowed in flight

    @property
    def room(self) -> int:
        return max(0, self.cap - self.inflight)

    @property
    def fraction(self) -> float:
        return self.inflight / self.cap if self.cap > 0 else math.inf


@dataclass(frozen=True)
class Choice:
    server_id: str
    reason: str  # "session", "session moved", "group", "group split", "least loaded"


def choose(loads: Sequence[ServerLoad], *, session: Optional[str] = None, group_home: Optional[str] = None,
           group_on_home: int = 0, imbalance: float = 0.25) -> Optional[Choice]:
    """The server for one request, or None: every server is at its cap, or the group waits for its own.

    The gate follows :func:`rollout_plugin.pool.routing.split_group`, per sample: the group's server,
    filled without the group's own ``group_on_home`` samples, is compared with the least-filled server
    with room; a gap above ``imbalance`` (a share of the cap) opens the gate. Closed, the sample goes
    to the group's server, or waits for room there (the servers are evenly busy: keep the prefix).
    """
    by_id = {s.server_id: s for s in loads}
    index = pick_engine([EngineLoad(i, s.inflight, s.cap) for i, s in enumerate(loads)], need=1)
    if index is None:
        return None
    least = loads[index]
    if session is not None and session in by_id:
        if by_id[session].room > 0:
            return Choice(session, "session")
        return Choice(least.server_id, "session moved")
    home = by_id.get(group_home) if group_home is not None else None
    if home is None:
        return Choice(least.server_id, "least loaded")
    base = (home.inflight - group_on_home) / home.cap if home.cap > 0 else math.inf
    if base - least.fraction > imbalance:
        return Choice(least.server_id, "group split")
    return Choice(home.server_id, "group") if home.room > 0 else None


def server_cap(*, max_num_seqs: Optional[int], max_model_len: int, group_size: int, servers: int,
               ratio: float, per_engine: Optional[int] = None) -> int:
    """Requests one server may hold: Xtuner's per-engine cap × the over-concurrency ratio.

    The engine batches at most ``max_num_seqs``; a little more in flight keeps its queue non-empty
    (:func:`rollout_plugin.pool.limits.derive_limits`). Never below one group.
    """
    limits = derive_limits(max_model_len=max_model_len, engines=max(1, servers), k=max(1, group_size),
                           ratio=ratio, per_engine=per_engine, max_num_seqs=max_num_seqs)
    return limits.engine_inflight
