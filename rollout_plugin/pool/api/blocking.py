"""A blocking facade over the pool: the async core runs on a private event-loop thread.

For trainers that call from sync code (TRL's callbacks and generation backend).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future as ThreadFuture
from typing import TypeVar

from rollout_plugin.config.schema import EngineConfig, PoolConfig
from rollout_plugin.errors import PoolError
from rollout_plugin.pool.engines.launcher import EngineEndpoint
from rollout_plugin.pool.policy.limits import Limits
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.observe.stats import PoolStats
from rollout_plugin.types import Request, Result

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["SyncRolloutPool"]


def _notify(lock: threading.Condition) -> None:
    with lock:
        lock.notify_all()


class SyncRolloutPool:
    """Blocking facade: the async pool runs on a private loop thread for the facade's lifetime."""

    def __init__(self, engine: EngineConfig | None = None, pool: PoolConfig | None = None, **kwargs):
        self._pool = RolloutPool(engine, pool, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def limits(self) -> Limits:
        return self._pool.limits

    @property
    def endpoints(self) -> list[EngineEndpoint]:
        return self._pool.endpoints

    def __enter__(self) -> SyncRolloutPool:
        ready: ThreadFuture[None] = ThreadFuture()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="rollout-pool", daemon=True)
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join()

    def _serve(self, ready: ThreadFuture[None]) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                async with self._pool:
                    ready.set_result(None)
                    await self._stop.wait()
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
                else:
                    log.error("pool stopped with an error: %s", exc)

        asyncio.run(main())

    def _run(self, coro):
        if self._loop is None:
            raise PoolError("use the pool inside `with SyncRolloutPool(...) as pool`")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        return self._run(self._pool.generate(list(requests)))

    def stream(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Results as they finish, in this thread. Closing the iterator early (``break``) drops the rest."""
        results: list[Result] = []
        lock = threading.Condition()
        requests = list(requests)

        async def feed() -> None:
            async for result in self._pool.stream(requests):
                with lock:
                    results.append(result)
                    lock.notify()

        if self._loop is None:
            raise PoolError("use the pool inside `with SyncRolloutPool(...) as pool`")
        done = asyncio.run_coroutine_threadsafe(feed(), self._loop)
        done.add_done_callback(lambda _: _notify(lock))
        given = 0
        try:
            while given < len(requests):
                with lock:
                    lock.wait_for(lambda: len(results) > given or done.done())
                    batch = results[given:]
                if not batch:
                    done.result()  # re-raises what stopped the feed
                    return
                given += len(batch)
                yield from batch
        finally:
            done.cancel()  # the consumer left: the feed's task is cancelled, its requests dropped

    def stats(self) -> PoolStats:
        """A snapshot taken on the pool's loop (its state is the loop's alone)."""
        async def snapshot() -> PoolStats:
            return self._pool.stats()

        return self._run(snapshot())

    def end_session(self, key: str) -> bool:
        """:meth:`RolloutPool.end_session`, on the pool's loop (the affinity map is the loop's alone)."""
        async def end() -> bool:
            return self._pool.end_session(key)

        return self._run(end())

    def run(self, fn: Callable[[RolloutPool], Awaitable[T]]) -> T:
        """``await fn(pool)`` on the pool's loop and return its value (e.g. a weight update)."""
        async def call() -> T:
            return await fn(self._pool)

        return self._run(call())

    @property
    def weight_version(self) -> int:
        return self._pool.weight_version

