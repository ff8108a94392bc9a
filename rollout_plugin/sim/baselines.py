"""The client patterns trainers use today, over any engine clients (the ones ``benchmarks/heterogeneous.py`` runs).

- static:  TRL server mode / static DP — session ``i`` goes to engine ``i mod N``, all at once;
- verl:    verl's router — least in flight by request count (ties to the lower index), no cap, all
           at once, sticky per session (prefix cache);
- least_loaded: the same pick for every turn, not sticky — a cache-unaware load balancer, the control for
           what stickiness buys in prefix-cache hits;
- distllm: fixed batches of ``batch`` groups (or whatever arrived within ``timeout_s``), sent
           round-robin as concurrent requests, the next batch only when the whole batch is back.

None of them caps engines or reads telemetry. A failed call goes to the next engine (up to
``retries`` times), as a client-side retry would; after that the request counts as failed.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Sequence

from rollout_plugin.pool.transport.http import CallError, EngineClient
from rollout_plugin.sim.workload import Session
from rollout_plugin.types import Request


class Baseline:
    """Counts what it generated; ``run`` drives every session to its end."""

    def __init__(self, clients: Sequence[EngineClient], retries: int, tool_latency_s: float):
        self.clients = list(clients)
        self.retries = retries
        self.tool_latency_s = tool_latency_s
        self.inflight = [0] * len(self.clients)
        self.output_tokens = 0
        self.failed = 0
        self.errors: list[str] = []  # the first few failures, for a benchmark to say why (a failed request is data)

    async def call(self, engine: int, request: Request) -> bool:
        for attempt in range(self.retries + 1):
            e = (engine + attempt) % len(self.clients)
            self.inflight[e] += 1
            try:
                gens = await self.clients[e].generate([request])
            except CallError as exc:
                self._note(exc)
                continue
            finally:
                self.inflight[e] -= 1
            self.output_tokens += sum(g.output_tokens for g in gens)
            return True
        self.failed += 1
        return False

    def _note(self, exc: CallError) -> None:
        if len(self.errors) < 5:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def pick(self, index: int) -> int:
        raise NotImplementedError

    async def session(self, index: int, session: Session) -> None:
        engine = self.pick(index)
        for t, request in enumerate(session.turns):
            if t:
                await asyncio.sleep(self.tool_latency_s)  # the tool call between turns (simulated time)
            if not await self.call(engine, request):
                return

    async def run(self, sessions: Sequence[Session]) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, s in enumerate(sessions):
                tg.create_task(self.session(i, s))


class StaticSplit(Baseline):
    def pick(self, index: int) -> int:
        return index % len(self.clients)


class LeastInflight(Baseline):
    """Each session picks and takes its slot before yielding (``call`` counts before it awaits), so
    sessions started together spread as verl's router spreads them. A lazy heap keeps the pick
    O(log N) at 10³ engines (entries whose count went stale are skipped)."""

    def __init__(self, clients: Sequence[EngineClient], retries: int, tool_latency_s: float):
        super().__init__(clients, retries, tool_latency_s)
        self._heap = [(0, j) for j in range(len(self.clients))]

    def pick(self, index: int) -> int:
        while True:
            count, j = self._heap[0]
            if count == self.inflight[j]:
                return j
            heapq.heappop(self._heap)
            heapq.heappush(self._heap, (self.inflight[j], j))

    async def call(self, engine: int, request: Request) -> bool:
        for attempt in range(self.retries + 1):
            e = (engine + attempt) % len(self.clients)
            self._move(e, +1)
            try:
                gens = await self.clients[e].generate([request])
            except CallError as exc:
                self._note(exc)
                continue
            finally:
                self._move(e, -1)
            self.output_tokens += sum(g.output_tokens for g in gens)
            return True
        self.failed += 1
        return False

    def _move(self, j: int, delta: int) -> None:
        self.inflight[j] += delta
        heapq.heappush(self._heap, (self.inflight[j], j))
        if len(self._heap) > 4 * len(self.clients):  # drop stale entries now and then
            self._heap = [(c, i) for i, c in enumerate(self.inflight)]
            heapq.heapify(self._heap)


class FixedBatch(Baseline):
    def __init__(self, clients: Sequence[EngineClient], retries: int, tool_latency_s: float, *, batch: int,
                 timeout_s: float):
        super().__init__(clients, retries, tool_latency_s)
        self.batch = batch
        self.timeout_s = timeout_s
        self._next = 0

    async def run(self, sessions: Sequence[Session]) -> None:
        ready: asyncio.Queue[tuple[Request, asyncio.Future[bool]]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def one(session: Session) -> None:
            for t, request in enumerate(session.turns):
                if t:
                    await asyncio.sleep(self.tool_latency_s)
                done: asyncio.Future[bool] = loop.create_future()
                ready.put_nowait((request, done))
                if not await done:
                    return

        async def batcher() -> None:
            while True:
                items = [await ready.get()]
                deadline = loop.time() + self.timeout_s
                while len(items) < self.batch:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        items.append(await asyncio.wait_for(ready.get(), left))
                    except TimeoutError:
                        break
                oks = await asyncio.gather(*(self.call((self._next + j) % len(self.clients), r)
                                             for j, (r, _) in enumerate(items)))
                self._next = (self._next + len(items)) % len(self.clients)
                for (_, done), ok in zip(items, oks):
                    done.set_result(ok)

        async with asyncio.TaskGroup() as tg:
            feeder = tg.create_task(batcher())
            async with asyncio.TaskGroup() as sessions_tg:
                for s in sessions:
                    sessions_tg.create_task(one(s))
            feeder.cancel()


class LeastLoaded(LeastInflight):
    """Cache-unaware: every turn of a session goes to the engine with the fewest in flight at that moment."""

    async def session(self, index: int, session: Session) -> None:
        for t, request in enumerate(session.turns):
            if t:
                await asyncio.sleep(self.tool_latency_s)
            if not await self.call(self.pick(index), request):
                return
