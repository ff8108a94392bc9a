"""A weight update is one serialized sequence whose every failure undoes what came before (issue 19, items 3-5).

pause admission -> freeze/abort/drain -> load -> verify -> adopt -> resume, one at a time: an engine that paused
is resumed whatever fails after it, a failed load or verify leaves the old version in force (and the old
weights: the pool restores them from its last source), two overlapping updates never load at once and
admission stays paused until the last one ends, and ``max_staleness`` bounds every result. On virtual time
against :class:`vllm_like.VllmLike` (every token encodes the weights that made it), plus the gateway's reload
over HTTP-level fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from aiohttp import web

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, GroupConfig, GroupMode, PoolConfig
from rollout_plugin.errors import EngineError
from rollout_plugin.gateway.app import Gateway, build_app
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.pool.core.engine_client import Unavailable
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.weights.sources import FolderWeights
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request, SamplingParams
from vllm_like import VllmLike
from vllm_shaped_server import serve_app

FOLDERS = {"w0": 0, "w1": 1, "w2": 2}


class Counting(VllmLike):
    """:class:`VllmLike` counting its pauses and resumes; ``refuse``: control routes that answer HTTP 500.

    vLLM's ``/pause`` answers 500 ``{"error": "Failed to pause generation: …"}`` when the engine raises
    (``vllm/entrypoints/rl/online/api_router.py``), and ``/collective_rpc`` (``reload_weights``) answers 500
    when a worker raises mid-load (``vllm/entrypoints/serve/dev/rpc/api_router.py``: the exception escapes
    to the server's handler)."""

    def __init__(self, name: str, refuse: tuple[str, ...] = ()):
        super().__init__(name)
        self.folders = dict(FOLDERS)
        self.refuse = refuse
        self.pauses = self.resumes = 0

    async def admin(self, path: str, body=None, *, timeout_s=None, method: str = "POST"):
        route = path.partition("?")[0]
        wanted = (body or {}).get("kwargs", {}).get("weights_path") if route == "/collective_rpc" else None
        if route in self.refuse or (wanted is not None and f"reload:{wanted}" in self.refuse):
            raise Unavailable(f"{self.name}: POST {path}: HTTP 500: Failed: injected", status=500)
        answer = await super().admin(path, body, timeout_s=timeout_s, method=method)
        self.pauses += route == "/pause"
        self.resumes += route == "/resume"
        return answer


def pool_of(clients, **cfg) -> RolloutPool:
    loop = asyncio.get_running_loop()
    return RolloutPool(pool=PoolConfig(**{"per_engine": 16, "over_concurrency_ratio": 1.0, "pack_size": 4, **cfg}),
                       controller=ControllerConfig(mode=ControllerMode.off), clients=clients, clock=loop.time)


def requests(count: int, n: int = 2, tokens: int = 40) -> list[Request]:
    return [Request(f"r{i}", [100 + i], n=n, sampling=SamplingParams(max_tokens=tokens)) for i in range(count)]


def tokens_match_tags(results, tokens: int = 40) -> None:
    """Every token was made by the weights its segment names; every sample is whole and in order."""
    for r in results:
        assert r.ok, r.error
        for s in r.samples:
            assert [t % 1000 for t in s.token_ids] == list(range(tokens))
            for seg in s.segments:
                assert {t // 1000 for t in s.token_ids[seg.start:seg.end]} == {seg.version}, (s.segments, s.token_ids)


# -- verified case 2: /pause refused by one engine ---------------------------------------------------------------

@pytest.mark.parametrize("front", ["update_weights", "weight_update"])
def test_a_refused_pause_resumes_the_engine_that_paused_and_admission(front):
    async def main():
        es = [Counting("e0"), Counting("e1", refuse=("/pause",))]
        async with pool_of(es) as pool:
            task = asyncio.ensure_future(pool.generate(requests(6)))
            await asyncio.sleep(0.1)  # 10 of 40 tokens in, on both engines
            with pytest.raises(EngineError, match="keep"):
                if front == "update_weights":
                    await pool.update_weights(1, FolderWeights("w1"), mode="keep")
                else:
                    async with pool.weight_update(1, mode="keep"):
                        pytest.fail("the load ran though an engine could not freeze")
            assert [e.paused for e in es] == [None, None]  # 0 engines left paused
            assert es[0].pauses == 1 and es[0].resumes >= 1
            assert not pool.paused and pool.weight_version == 0
            results = await asyncio.wait_for(task, 30)  # e0's calls were frozen: they finish now
        tokens_match_tags(results)
        assert {s.versions for r in results for s in r.samples} == {(0,)}
        assert [e.weights for e in es] == [0, 0]
    run_virtual(main())


# -- a failed load or verify: the old version and the old weights stay in force ----------------------------------

@pytest.mark.parametrize("mode", ["keep", "continue", "drain"])
def test_a_load_failing_on_one_engine_restores_the_old_weights_and_resumes_everything(mode):
    async def main():
        es = [Counting("e0"), Counting("e1", refuse=("reload:w2",))]
        async with pool_of(es) as pool:
            await pool.update_weights(1, FolderWeights("w1"))
            task = asyncio.ensure_future(pool.generate(requests(6)))
            await asyncio.sleep(0.1)
            with pytest.raises(EngineError, match="e1"):
                await pool.update_weights(2, FolderWeights("w2"), mode=mode)
            assert [e.paused for e in es] == [None, None]
            assert not pool.paused and pool.weight_version == 1
            assert [e.weights for e in es] == [1, 1]  # e0 had loaded w2: restored from the last source
            results = await asyncio.wait_for(task, 30)
            results += await pool.generate([Request("after", [7], n=2, sampling=SamplingParams(max_tokens=40))])
        tokens_match_tags(results)
        assert {v for r in results for s in r.samples for v in s.versions} == {1}
        assert all(r.weight_version == 1 for r in results)
    run_virtual(main())


def test_a_failed_reload_of_a_folder_written_in_place_takes_the_engines_out_until_the_next_update():
    """The trainer writes each step's weights into one folder: after a failed load it holds the new weights, so
    the pool cannot restore the old ones from it. The engines leave rotation (never tagged with weights they
    may not hold); the next update brings them back."""
    async def main():
        es = [Counting("e0"), Counting("e1")]
        async with pool_of(es) as pool:
            await pool.update_weights(1, FolderWeights("w1"))
            es[1].refuse = ("reload:w1",)
            with pytest.raises(EngineError, match="e1"):
                await pool.update_weights(2, FolderWeights("w1"))
            assert pool.weight_version == 1 and not pool.paused and [e.paused for e in es] == [None, None]
            assert [e.state for e in pool.stats().engines] == ["stale", "stale"]
            es[1].refuse = ()
            await pool.update_weights(2, FolderWeights("w2"))
            assert [e.state for e in pool.stats().engines] == ["live", "live"]
            results = await asyncio.wait_for(pool.generate(requests(4)), 30)
        tokens_match_tags(results)
        assert {v for r in results for s in r.samples for v in s.versions} == {2}
    run_virtual(main())


def test_a_checksum_mismatch_adopts_nothing():
    async def main():
        es = [Counting("e0"), Counting("e1")]
        es[1].folders["w1"] = 7  # reads another folder: other weights under the same path
        async with pool_of(es) as pool:
            with pytest.raises(EngineError, match="checksums differ"):
                await pool.update_weights(1, FolderWeights("w1"))
            assert pool.weight_version == 0 and not pool.paused
            assert [e.paused for e in es] == [None, None]
            assert "1" not in [e.version for e in es]  # no engine keeps the tag of weights the pool did not adopt
    run_virtual(main())


# -- one update at a time --------------------------------------------------------------------------------------------

class Gated:
    """A weight source whose load waits for ``gate``; ``log`` records each load's start and end."""

    def __init__(self, folder: str, log: list):
        self.folder, self.log = folder, log
        self.description = f"gated {folder}"
        self.started, self.gate = asyncio.Event(), asyncio.Event()

    async def load(self, pool, engines) -> None:
        self.log.append(("start", self.folder))
        self.started.set()
        await self.gate.wait()
        await FolderWeights(self.folder).load(pool, engines)
        self.log.append(("end", self.folder))


def test_overlapping_updates_load_one_at_a_time_and_admission_waits_for_the_last():
    async def main():
        es = [Counting("e0"), Counting("e1")]
        log: list = []
        a, b = Gated("w1", log), Gated("w2", log)
        async with pool_of(es) as pool:
            first = asyncio.ensure_future(pool.update_weights(1, a))
            await a.started.wait()
            second = asyncio.ensure_future(pool.update_weights(2, b))
            await asyncio.sleep(1.0)  # virtual: the second had every chance to start loading
            assert not b.started.is_set()
            late = asyncio.ensure_future(pool.generate(requests(2)))
            a.gate.set()
            await first
            await b.started.wait()
            assert pool.paused  # the first update's end did not resume admission under the second's load
            calls = sum(e.calls for e in es)
            await asyncio.sleep(1.0)
            assert sum(e.calls for e in es) == calls == 0 and not late.done()
            b.gate.set()
            assert await second == 2
            results = await asyncio.wait_for(late, 30)
        assert log == [("start", "w1"), ("end", "w1"), ("start", "w2"), ("end", "w2")]
        assert not pool.paused
        tokens_match_tags(results)
        assert {v for r in results for s in r.samples for v in s.versions} == {2}
    run_virtual(main())


def test_a_refit_waits_for_the_update_under_way_and_loads_its_weights():
    async def main():
        es = [Counting("e0"), Counting("e1")]
        log: list = []
        a, b = Gated("w1", log), Gated("w2", log)
        a.gate.set()
        async with pool_of(es) as pool:
            await pool.update_weights(1, a)  # the pool's weight source: refits load it
            update = asyncio.ensure_future(pool.update_weights(2, b))
            await b.started.wait()
            pool._dispatcher.replace_client(1, es[1], stale=True)  # e1 restarted meanwhile: stale
            refit = asyncio.ensure_future(pool._ops.refit(["e1"]))
            await asyncio.sleep(1.0)
            assert log[-1] == ("start", "w2")  # nothing else loads while the update does
            b.gate.set()
            await update
            await asyncio.wait_for(refit, 30)
            assert not pool.paused and pool.weight_version == 2
        assert log == [("start", "w1"), ("end", "w1"), ("start", "w2"), ("end", "w2"), ("start", "w2"), ("end", "w2")]
        assert [e.weights for e in es] == [2, 2] and [e.paused for e in es] == [None, None]
    run_virtual(main())


# -- max_staleness is a bound ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_staleness", [0, 1])
def test_max_staleness_bounds_continued_samples_too(max_staleness):
    """Version 0 tokens are continued under version 1 (mode=continue); the next update, under keep, must not
    let them reach a result once they are more than ``max_staleness`` versions old: neither the call running
    with a version-0 prefix nor a requeued one."""
    async def main():
        es = [Counting("e0")]
        async with pool_of(es) as pool:
            task = asyncio.ensure_future(pool.generate(requests(2)))
            await asyncio.sleep(0.1)
            await pool.update_weights(1, FolderWeights("w1"), mode="continue")
            await asyncio.sleep(0.1)
            await pool.update_weights(2, FolderWeights("w2"), mode="keep", max_staleness=max_staleness)
            results = await asyncio.wait_for(task, 30)
        tokens_match_tags(results)
        assert all(min(s.versions) >= 2 - max_staleness for r in results for s in r.samples), \
            [s.segments for r in results for s in r.samples]
        assert all(r.weight_version >= 2 - max_staleness for r in results)
    run_virtual(main())


# -- the gateway's reload goes through the sequence ---------------------------------------------------------------

def client_for(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(gw)), base_url="http://gw")


def fake_vllm(name: str, seen: list, *, reload_fails: bool) -> web.Application:
    """vLLM-shaped admin routes: ``/collective_rpc`` reload answers 500 when a worker raises
    (``vllm/entrypoints/serve/dev/rpc/api_router.py``); ``/weight_info`` and ``/update_weight_version`` as
    ``vllm/entrypoints/rl/online/api_router.py`` answers them."""
    state = {"version": "default"}

    async def handle(request: web.Request) -> web.Response:
        body = json.loads(await request.read() or b"{}")
        seen.append((name, request.path, body))
        if request.path == "/collective_rpc":
            if reload_fails:
                return web.Response(status=500, text="Internal Server Error")
            return web.json_response({"results": [None]})
        if request.path == "/update_weight_version":
            state["version"] = body["new_version"]
            return web.json_response({"success": True, "new_version": state["version"]})
        if request.path == "/weight_info":
            return web.json_response({"weight_version": state["version"]})
        if request.path in ("/reset_prefix_cache", "/pause", "/resume"):
            return web.json_response({"status": "ok"})
        return web.json_response({"detail": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_a_gateway_reload_failing_on_one_engine_adopts_nothing():
    relay, seen = Relay(), []
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve_app(fake_vllm(f"engine{i}", seen, reload_fails=i == 1)))
                for i in range(2)]
        clients = [PassThroughClient(f"engine{i}", url, api_key=None, model="tiny", max_connections=8,
                                     connect_s=5, request_s=5, admission_s=5, health_s=5, relay=relay)
                   for i, url in enumerate(urls)]
        pool = RolloutPool(pool=PoolConfig(per_engine=8), controller=ControllerConfig(mode=ControllerMode.off),
                           clients=clients)
        async with pool:
            gw = Gateway(pool, relay, model="m", max_model_len=512, api_key=None, world_size=2)
            async with client_for(gw) as http:
                answer = await http.post("/admin/reload_weights", json={"weight_version": 5})
                assert answer.status_code == 502, answer.text
                assert "engine1" in answer.text
                assert pool.weight_version == 0 and not pool.paused
                tagged = [(name, body) for name, path, body in seen if path == "/update_weight_version"]
                assert {"new_version": "5"} not in [b for _, b in tagged]  # no engine tagged with 5


async def test_a_raw_reload_relayed_by_the_gateway_is_a_weight_update():
    """``POST /collective_rpc {"method": "reload_weights"}`` (vLLM's own route, relayed to every engine) loads
    weights: the pool adopts the next version only through its sequence, never by a bare fan-out."""
    relay, seen = Relay(), []
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve_app(fake_vllm(f"engine{i}", seen, reload_fails=False)))
                for i in range(2)]
        clients = [PassThroughClient(f"engine{i}", url, api_key=None, model="tiny", max_connections=8,
                                     connect_s=5, request_s=5, admission_s=5, health_s=5, relay=relay)
                   for i, url in enumerate(urls)]
        pool = RolloutPool(pool=PoolConfig(per_engine=8), controller=ControllerConfig(mode=ControllerMode.off),
                           clients=clients)
        async with pool:
            gw = Gateway(pool, relay, model="m", max_model_len=512, api_key=None, world_size=2)
            async with client_for(gw) as http:
                answer = await http.post("/collective_rpc", json={"method": "reload_weights",
                                                                  "kwargs": {"weights_path": "/ckpt/7"}})
                assert answer.status_code == 200, answer.text
                assert pool.weight_version == 1 and not pool.paused
                tags = sorted((name, body["new_version"]) for name, path, body in seen
                              if path == "/update_weight_version")
                assert tags == [("engine0", "1"), ("engine1", "1")]  # engine-reported, read back by the sequence
                other = await http.post("/collective_rpc", json={"method": "get_model_info"})
                assert other.status_code == 200 and pool.weight_version == 1  # other RPCs still fan out as they are


def test_max_staleness_bounds_the_finished_pieces_of_a_group_too():
    """A group's pieces finish apart: one under version 0 waits in the group for its sibling. Once version 0 is
    more than ``max_staleness`` behind, the finished piece is generated again, or the group's result would
    carry it."""
    async def main():
        es = [Counting("e0"), Counting("e1")]
        es[1].latency_s = 0.3  # its piece starts later and is still generating when the weights change
        async with pool_of(es, groups=GroupConfig(mode=GroupMode.split), pack_size=1) as pool:
            task = asyncio.ensure_future(pool.generate(requests(1, n=2)))
            await asyncio.sleep(0.5)  # e0's piece done (0.4 s), e1's 20 tokens in
            await pool.update_weights(1, FolderWeights("w1"), mode="continue")
            await pool.update_weights(2, FolderWeights("w2"), mode="keep", max_staleness=0)
            (result,) = await asyncio.wait_for(task, 30)
        tokens_match_tags([result])
        assert {v for s in result.samples for v in s.versions} == {2}, [s.segments for s in result.samples]
        assert result.weight_version == 2
    run_virtual(main())
