"""verl's servers as lease engines: the pool admits a request, verl runs it, the release ends the lease.

verl calls its servers itself (Ray actor handles); the router only decides *where* and *when*. So each
verl server is an :class:`~rollout_plugin.pool.core.engine_client.EngineClient` whose "call" is a lease:
when the pool admits a request on it, :meth:`LeaseClient.generate` tells the waiting ``acquire_server``
which server it got, then holds the pool's in-flight slot until verl's ``release_server``. The pool's
ledger, caps, affinity and controller (fed by each server's ``/metrics``) are the same as everywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout_plugin.pool import Generation
from rollout_plugin.types import Request, Sample

log = logging.getLogger(__name__)

__all__ = ["LEASE_PROMPT", "Lease", "LeaseClient", "Leases"]

# A chat-kind placeholder: the pool sends chat requests one per call, so each lease is its own call.
LEASE_PROMPT = [{"role": "user", "content": ""}]


@dataclass(eq=False)
class Lease:
    request_id: str  # verl's (a multi-turn session reuses it turn after turn)
    id: str  # the pool's, unique per acquire
    admitted: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    released: asyncio.Event = field(default_factory=asyncio.Event)
    ticket: asyncio.Future[Any] | None = None

    @property
    def server(self) -> str | None:
        """The server the pool admitted it on (None while it waits)."""
        done = self.admitted.done() and not self.admitted.cancelled()
        return self.admitted.result() if done else None


class Leases:
    """Open leases by the pool's request id and by verl's (oldest first, should a session's turns overlap)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_request: dict[str, deque[Lease]] = {}
        self._seq = itertools.count()

    @property
    def open_count(self) -> int:
        return len(self._by_id)

    def open(self, request_id: str) -> Lease:
        lease = Lease(request_id, f"lease-{next(self._seq)}")
        self._by_id[lease.id] = lease
        self._by_request.setdefault(request_id, deque()).append(lease)
        return lease

    def get(self, lease_id: str) -> Lease | None:
        return self._by_id.get(lease_id)

    def release(self, request_id: str, server_id: str) -> Lease | None:
        """verl is done with ``server_id``: the oldest open lease ``request_id`` holds *there* ends (returned).
        None if it holds none there (its server was removed, which ended it): never another turn's lease."""
        lease = next((x for x in self._by_request.get(request_id, ()) if x.server == server_id), None)
        if lease is not None:
            self._end(lease)
        return lease

    def end_server(self, server_id: str) -> list[Lease]:
        """``server_id`` left the pool: every lease admitted there ends (a late release finds none)."""
        ended = [x for x in self._by_id.values() if x.server == server_id]
        for lease in ended:
            self._end(lease)
        return ended

    def close(self) -> None:
        """The router closed: every lease ends (the pool resolves their requests)."""
        for lease in list(self._by_id.values()):
            self._end(lease)

    def drop(self, lease: Lease) -> None:
        """The acquiring caller is gone (timed out, cancelled): the request leaves the pool, any slot frees."""
        if lease.ticket is not None:
            lease.ticket.cancel()  # queued: dropped; admitted: its lease call is cancelled
        self._end(lease)

    def _end(self, lease: Lease) -> None:
        self._by_id.pop(lease.id, None)
        queue = self._by_request.get(lease.request_id)
        if queue is not None and lease in queue:
            queue.remove(lease)
            if not queue:
                del self._by_request[lease.request_id]
        lease.released.set()


class LeaseClient:
    """One verl server: admission hands it to the waiting acquire; the call lasts until verl releases it."""

    def __init__(self, name: str, leases: Leases, metrics_url: str, metrics_timeout_s: float):
        self.name = name
        self.leases = leases
        self.metrics_url = metrics_url.format(server=name)
        self.metrics_timeout_s = metrics_timeout_s
        self._http: Any = None

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        out = []
        for r in requests:
            lease = self.leases.get(r.id)
            if lease is not None:
                if not lease.admitted.done():
                    lease.admitted.set_result(self.name)
                await lease.released.wait()
            out.append(Generation(tuple(Sample("", (), None, "lease") for _ in range(r.n)), 0))
        return out

    async def healthy(self) -> bool:
        return True  # verl watches its servers; a lease never fails

    async def metrics(self) -> str | None:
        import httpx  # the router actor runs where verl runs; httpx comes with it

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.metrics_timeout_s)
        try:
            response = await self._http.get(self.metrics_url)
            response.raise_for_status()
            return response.text
        except httpx.HTTPError as exc:  # a server without /metrics keeps its cap (the controller holds)
            log.debug("server %s: /metrics unavailable (%s)", self.name, exc)
            return None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
