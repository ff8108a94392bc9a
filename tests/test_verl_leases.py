"""The verl router's leases end when they should (issue 19, item 6): in process, no Ray, no verl import.

verl 0.9.1's ``LLMServerClient.generate`` awaits ``acquire_server`` and, in ``finally``, fires
``release_server(server_id, request_id=...)`` without awaiting it (``verl/workers/rollout/llm_server.py``);
``FullyAsyncLLMServerClient`` retries an acquire that raised "No available servers in load balancer";
hybrid replicas leave and rejoin through ``remove_servers`` / ``add_servers``
(``verl/experimental/fully_async_policy/fully_async_rollouter.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from rollout_plugin.adapters.verl.router import NO_SERVER, PoolRouter
from rollout_plugin.errors import PoolError


class _Remote:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class FakeHandle:
    """A verl server handle where only ``get_rollout_config`` is called (the router never calls generate)."""

    def __init__(self, **config: Any):
        self.get_rollout_config = _Remote(lambda: config)


def router_of(servers: int = 2, *, max_num_seqs: int = 4, **settings: Any) -> PoolRouter:
    handles = {f"s{i}": FakeHandle(max_num_seqs=max_num_seqs, n=1, max_model_len=1024) for i in range(servers)}
    return PoolRouter(handles, {"router_class": "x", "over_concurrency_ratio": 1.0,
                                "controller": {"mode": "off"}, **settings})


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0)  # yield to the router's pool until the condition holds


def test_close_fails_pending_acquires_at_once_and_refuses_new_ones():
    async def main() -> None:
        router = router_of(1, max_num_seqs=1)
        await router.acquire_server("held", prompt_ids=[0])
        pending = [asyncio.create_task(router.acquire_server(f"w{i}", prompt_ids=[i])) for i in range(3)]
        await until(lambda: router._pool.queued == 3)
        await router.close()
        async with asyncio.timeout(1.0):  # old code: they waited out admission_timeout_s (1,800 s)
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and "closed" in str(o) for o in outcomes), outcomes
        assert not any(NO_SERVER in str(o) for o in outcomes)  # verl's fully-async client would retry that
        with pytest.raises(RuntimeError, match="closed"):
            await router.acquire_server("late", prompt_ids=[9])  # not a fresh pool behind verl's back
        assert router._leases.open_count == 0

    asyncio.run(main())


def test_a_pool_failure_fails_pending_acquires_at_once():
    async def main() -> None:
        router = router_of(1, max_num_seqs=1)
        await router.acquire_server("held", prompt_ids=[0])
        pending = asyncio.create_task(router.acquire_server("w", prompt_ids=[1]))
        await until(lambda: router._pool.queued == 1)
        router._pool._dispatcher.fail(PoolError("the dispatcher failed: boom"))
        async with asyncio.timeout(1.0):
            with pytest.raises(RuntimeError, match="boom"):
                await pending
        with pytest.raises(RuntimeError, match="boom"):
            await router.acquire_server("late", prompt_ids=[9])
        await router.close()

    asyncio.run(main())


def test_a_server_removed_while_its_acquire_wakes_moves_the_acquire_and_leaks_no_slot():
    """Admitted on a server that verl removes before the waiting acquire wakes: the old router raised with the
    lease left open; verl's fully-async client retried under the same request id, and that request's release
    then ended the orphan instead of its own lease — one slot lost on the other server, each time."""
    async def main() -> None:
        router = router_of(2, max_num_seqs=1)
        await router._started()
        opened = router._leases.open

        def open_and_remove_on_admission(request_id: str):
            lease = opened(request_id)
            if request_id == "r" and not removed:
                # verl removes the server the lease was just admitted on. This callback was added before the
                # acquire began to wait, so it runs first, and the removal's first step before the acquire wakes.
                lease.admitted.add_done_callback(
                    lambda f: removed.append(asyncio.ensure_future(router.remove_servers([f.result()]))))
            return lease

        removed: list[Any] = []
        router._leases.open = open_and_remove_on_admission
        try:
            got = await router.acquire_server("r", prompt_ids=[1])
        except RuntimeError as exc:  # old router; verl's FullyAsyncLLMServerClient retries this message
            assert NO_SERVER in str(exc)
            got = await router.acquire_server("r", prompt_ids=[1])
        assert removed and got[0] in router._handles
        await removed[0]
        await router.release_server(got[0], request_id="r")
        status = await router.get_status()
        assert status["total_inflight"] == 0, status  # old: the retried lease held its slot for ever
        assert status["servers"] == {got[0]: 0}
        await router.close()

    asyncio.run(main())


def test_removing_a_server_ends_its_leases_and_a_release_ends_exactly_its_own():
    async def main() -> None:
        router = router_of(2, max_num_seqs=2)
        first, _ = await router.acquire_server("r", prompt_ids=[1])  # a session's turn on one server
        other = "s1" if first == "s0" else "s0"
        await router.remove_servers([first])  # verl aborts what ran there; its release comes later
        assert (await router.get_status())["total_inflight"] == 0  # old: the removed server's lease stayed
        again, _ = await router.acquire_server("r", prompt_ids=[1, 2])  # the retried turn, same request id
        assert again == other
        await router.release_server(again, request_id="r")  # this turn's release arrives first
        assert (await router.get_status())["total_inflight"] == 0  # old: it ended the orphan, not its own
        await router.release_server(first, request_id="r")  # the late release of the removed server's turn
        assert (await router.get_status())["total_inflight"] == 0 and router._leases.open_count == 0
        third, _ = await router.acquire_server("r", prompt_ids=[1, 2, 3])
        assert third == other and (await router.get_status())["servers"] == {other: 1}
        await router.close()

    asyncio.run(main())


def test_a_server_removed_and_added_again_is_the_one_in_rotation():
    """verl's hybrid replicas leave and rejoin under the same id at every weight sync."""
    async def main() -> None:
        router = router_of(2, max_num_seqs=1)
        await router._started()
        await router.remove_servers(["s0"])
        await router.add_servers({"s0": FakeHandle(max_num_seqs=1, n=1, max_model_len=1024)})
        await router.remove_servers(["s0"])  # old: this retired the first s0 again; the second stayed in
        got = [await router.acquire_server("a", prompt_ids=[1])]
        waiting = asyncio.create_task(router.acquire_server("b", prompt_ids=[2]))
        await until(lambda: router._pool.queued == 1)  # only s1 serves, and it is full
        assert got[0][0] == "s1" and not waiting.done()
        await router.release_server("s1", request_id="a")
        assert (await asyncio.wait_for(waiting, 5))[0] == "s1"
        await router.close()

    asyncio.run(main())

