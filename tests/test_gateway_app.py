"""The gateway's routes in-process, over engines faked at the HTTP layer (small aiohttp servers on this loop):
splitting, order, error mapping, auth, admin fan-out. The same routes run against real engines in test_gateway.py."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
from aiohttp import web

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig
from rollout_plugin.gateway.app import Gateway, build_app
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.pool.api.pool import RolloutPool
from vllm_shaped_server import serve_app


def fake_vllm(name: str, seen: list) -> web.Application:
    """A vLLM-shaped server: echoes prompts; 400 for max_tokens > 100; 404 for /pause (no dev mode)."""

    async def handle(request: web.Request) -> web.Response:
        path = request.path
        body = json.loads(await request.read() or b"{}")
        seen.append((name, path, body))
        if path == "/v1/completions":
            if body.get("max_tokens", 16) > 100:
                return web.json_response({"error": {"message": "max_tokens is too large"}}, status=400)
            n = body.get("n", 1)
            return web.json_response({
                "id": f"cmpl-{name}", "object": "text_completion", "model": body["model"],
                "choices": [{"index": j, "text": f"{body['prompt']}/{j}", "token_ids": [1, 2],
                             "finish_reason": "length"} for j in range(n)],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2 * n, "total_tokens": 1 + 2 * n}})
        if path == "/v1/chat/completions":
            return web.json_response({"choices": [{"index": 0, "message": {
                "role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}})
        if path in ("/reset_prefix_cache", "/collective_rpc"):
            return web.json_response({"success": True})
        return web.json_response({"detail": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def gateway():
    relay, seen = Relay(), []
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve_app(fake_vllm(f"engine{i}", seen))) for i in range(2)]
        clients = [PassThroughClient(f"engine{i}", url, api_key=None, model="tiny", max_connections=8,
                                     connect_s=5, request_s=5, admission_s=5, health_s=5, relay=relay)
                   for i, url in enumerate(urls)]
        pool = RolloutPool(pool=PoolConfig(per_engine=8), controller=ControllerConfig(mode=ControllerMode.off),
                           clients=clients)
        async with pool:
            yield pool, relay, seen


def client_for(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(gw)), base_url="http://gw")


async def test_a_batch_is_split_over_both_engines_and_merged_in_order(gateway):
    pool, relay, seen = gateway
    gw = Gateway(pool, relay, model="pool-model", max_model_len=512, api_key=None, world_size=2)
    async with client_for(gw) as http:
        resp = await http.post("/v1/completions", json={"model": "anything", "prompt": ["a", "b", "c", "d"], "n": 2})
        data = resp.json()
        assert resp.status_code == 200
        assert [c["text"] for c in data["choices"]] == ["a/0", "a/1", "b/0", "b/1", "c/0", "c/1", "d/0", "d/1"]
        assert [c["index"] for c in data["choices"]] == list(range(8))
        assert data["usage"]["completion_tokens"] == 16
        assert {name for name, path, _ in seen if path == "/v1/completions"} == {"engine0", "engine1"}
        assert all(body["model"] == "tiny" for _, path, body in seen if path.startswith("/v1/"))
        assert (await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
                ).json()["choices"][0]["message"]["content"] == "hi"
        assert (await http.get("/v1/models")).json()["data"][0]["id"] == "pool-model"
        assert (await http.get("/get_world_size")).json() == {"world_size": 2}
        assert (await http.get("/health")).json()["healthy"] == ["engine0", "engine1"]
        assert 'rollout_pool_results_total{engine="engine1",outcome="ok"}' in (await http.get("/metrics")).text
    assert relay.exchanges == {}  # nothing left behind


async def test_errors_keep_the_engines_status_and_unsupported_calls_say_why(gateway):
    pool, relay, seen = gateway
    gw = Gateway(pool, relay, model="m", max_model_len=512, api_key=None, world_size=2)
    async with client_for(gw) as http:
        bad = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1000})
        assert bad.status_code == 400 and "max_tokens is too large" in bad.json()["error"]["message"]
        assert (await http.post("/v1/completions", content=b"not json")).status_code == 400
        nccl = await http.post("/update_weights", json={})
        assert nccl.status_code == 501 and "NCCL" in nccl.json()["error"]["message"]
        pause = await http.post("/pause")  # the fakes have no dev mode
        assert pause.status_code == 501 and "engine.dev_mode=true" in pause.json()["error"]["message"]
    assert relay.exchanges == {}


async def test_admin_calls_fan_out_and_pause_holds_admission(gateway):
    pool, relay, seen = gateway
    gw = Gateway(pool, relay, model="m", max_model_len=512, api_key=None, world_size=2)
    async with client_for(gw) as http:
        reset = (await http.post("/reset_prefix_cache")).json()
        assert reset["success"] and set(reset["engines"]) == {"engine0", "engine1"}
        assert (await http.post("/admin/pause")).json()["paused"] is True
        assert pool.monitor.dispatcher.paused
        assert (await http.post("/admin/resume", json={"weight_version": 3})).json() == {
            "paused": False, "weight_version": 3}
        reload = (await http.post("/admin/reload_weights")).json()
        assert reload["success"] and pool.weight_version == 4
        rpc = [(name, body) for name, path, body in seen if path == "/collective_rpc"]
        assert sorted(rpc) == [("engine0", {"method": "reload_weights"}), ("engine1", {"method": "reload_weights"})]


async def test_api_key_is_required_everywhere_but_health(gateway):
    pool, relay, _ = gateway
    gw = Gateway(pool, relay, model="m", max_model_len=512, api_key="s3cret", world_size=2)
    async with client_for(gw) as http:
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await http.get("/health")).status_code == 200
