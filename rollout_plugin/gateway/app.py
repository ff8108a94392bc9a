"""The gateway's HTTP routes: OpenAI-compatible generation, health, metrics, and admin fan-out.

Generation (``/v1/completions``, ``/v1/chat/completions``) goes through the pool; admin calls
(pause/resume, weight reload, prefix-cache reset, ``/collective_rpc``) go to every engine at once.
TRL's NCCL weight-transfer endpoints answer 501: weights stream engine by engine, not through a
proxy. FastAPI is imported here, and this module only by ``rollout-plugin serve``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from rollout_plugin.gateway.batching import merge_completions, prompt_count, split_prompts
from rollout_plugin.gateway.relay import Relay, gateway_request
from rollout_plugin.pool.pool import RolloutPool

log = logging.getLogger(__name__)

NCCL_ROUTES = ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
               "/close_communicator", "/server_info")
NCCL_HELP = ("the gateway does not relay NCCL weight transfer (weights go to each engine directly): point the "
             "trainer's weight sync at the engines (engine.urls), or save the weights where the engines load "
             "them and POST /admin/reload_weights")
OPEN_ROUTES = ("/health",)  # probes need no key


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Gateway:
    """Handlers over one running pool. ``model``: the name /v1/models reports and callers may send."""

    def __init__(self, pool: RolloutPool, relay: Relay, *, model: str, max_model_len: int, api_key: str | None,
                 world_size: int):
        self.pool = pool
        self.relay = relay
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.world_size = world_size
        self.created = int(time.time())

    # -- generation ------------------------------------------------------------------------------
    async def _one(self, route: str, body: dict[str, Any], samples: int) -> tuple[dict[str, Any] | None,
                                                                                  JSONResponse | None]:
        request = gateway_request(route, body, samples, self.pool.limits.engine_inflight)
        try:
            result = await self.pool.submit(request)
        finally:  # a caller that hung up leaves nothing behind in the relay
            data, failure = self.relay.take(request.id)
        if result.ok and data is not None:
            return data, None
        status, text = failure or (None, result.error or "no answer")
        if status is not None and 400 <= status < 500 and status != 429:
            return None, _error(status, text)
        return None, _error(502, f"no engine produced an answer after {result.attempts} attempt(s): {text}",
                            "upstream_error")

    async def completions(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        n = int(body.get("n") or 1)
        parts = split_prompts(body)
        answers = await asyncio.gather(*(self._one("completions", part, n) for part in parts))
        for _, failure in answers:
            if failure is not None:
                return failure
        return JSONResponse(merge_completions([a for a, _ in answers], n))  # type: ignore[misc]

    async def chat(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        data, failure = await self._one("chat", body, int(body.get("n") or 1))
        return failure or JSONResponse(data)

    async def _body(self, request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        if body.get("stream"):
            return _error(400, "stream=true is not supported by the gateway; send stream=false (the default)")
        if "prompt" in body and prompt_count(body["prompt"]) == 0:
            return _error(400, "prompt is empty")
        return body

    # -- state -----------------------------------------------------------------------------------
    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.created, "owned_by": "rollout-plugin",
            "root": self.model, "max_model_len": self.max_model_len}]})

    async def health(self, request: Request) -> JSONResponse:
        engines = self.pool.stats().engines
        healthy = [e.name for e in engines if e.healthy]
        status = 200 if healthy else 503
        return JSONResponse({"status": "ok" if healthy else "no healthy engine", "healthy": healthy,
                             "engines": len(engines)}, status_code=status)

    async def metrics(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse(self.pool.metrics_text(), media_type="text/plain; version=0.0.4")

    async def get_world_size(self, request: Request) -> JSONResponse:
        return JSONResponse({"world_size": self.world_size})

    # -- admin -----------------------------------------------------------------------------------
    async def fan_out(self, path: str, body: dict[str, Any] | None) -> JSONResponse:
        answers = await self.pool.control(path, body, timeout_s=60.0)
        per_engine = {a.engine: {"status": a.status, "answer": a.body if a.error is None else a.error}
                      for a in answers}
        worst = max((a.status for a in answers), default=200)
        if worst == 404:
            return _error(501, f"POST {path}: the engines lack it (vLLM needs engine.dev_mode=true, "
                               f"VLLM_SERVER_DEV_MODE=1)", "not_implemented")
        ok = all(a.ok for a in answers)
        return JSONResponse({"success": ok, "engines": per_engine}, status_code=200 if ok else 502)

    async def pause(self, request: Request) -> JSONResponse:
        await self.pool.pause(drain=True)  # in-flight calls finish; queued ones wait
        return JSONResponse({"paused": True, "weight_version": self.pool.weight_version})

    async def resume(self, request: Request) -> JSONResponse:
        body = await self._optional_body(request)
        version = body.get("weight_version")
        self.pool.resume(int(version) if version is not None else None)
        return JSONResponse({"paused": False, "weight_version": self.pool.weight_version})

    async def reload_weights(self, request: Request) -> JSONResponse:
        """Drain, ``reload_weights`` on every engine, resume under the next (or given) weight version."""
        body = await self._optional_body(request)
        version = body.get("weight_version")
        async with self.pool.weight_update(int(version) if version is not None else None):
            answer = await self.fan_out("/collective_rpc", {"method": "reload_weights"})
        return answer

    async def relay_admin(self, request: Request) -> JSONResponse:
        return await self.fan_out(request.url.path, await self._optional_body(request))

    async def not_relayed(self, request: Request) -> JSONResponse:
        return _error(501, f"{request.url.path}: {NCCL_HELP}", "not_implemented")

    @staticmethod
    async def _optional_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        try:
            body = await request.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}


def build_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="rollout-plugin gateway", docs_url=None, redoc_url=None, openapi_url=None)

    if gw.api_key:
        expected = f"Bearer {gw.api_key}"

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path not in OPEN_ROUTES and request.headers.get("authorization") != expected:
                return _error(401, "missing or wrong API key (send Authorization: Bearer <serve.api_key>)",
                              "authentication_error")
            return await call_next(request)

    app.add_api_route("/v1/completions", gw.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", gw.chat, methods=["POST"])
    app.add_api_route("/v1/models", gw.models, methods=["GET"])
    app.add_api_route("/health", gw.health, methods=["GET"])
    app.add_api_route("/metrics", gw.metrics, methods=["GET"])
    app.add_api_route("/get_world_size", gw.get_world_size, methods=["GET"])
    app.add_api_route("/admin/pause", gw.pause, methods=["POST"])
    app.add_api_route("/admin/resume", gw.resume, methods=["POST"])
    app.add_api_route("/admin/reload_weights", gw.reload_weights, methods=["POST"])
    for path in ("/reset_prefix_cache", "/collective_rpc", "/pause", "/resume"):
        app.add_api_route(path, gw.relay_admin, methods=["POST"])  # vLLM's own admin calls, to every engine
    for path in NCCL_ROUTES:
        app.add_api_route(path, gw.not_relayed, methods=["GET", "POST"])
    return app
