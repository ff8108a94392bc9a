"""The gateway's HTTP routes: OpenAI-compatible generation, health, metrics, and admin fan-out.

Generation (``/v1/completions``, ``/v1/chat/completions``, streamed or not) goes through the pool;
completions the pool can model go in as its own requests and pack with other callers' (:mod:`.native`),
the rest pass through (:mod:`.relay`), streams event by event (:mod:`.streaming`). A turn of an agentic
session (``X-Session-ID``, :mod:`.sessions`) passes through alone to the session's home engine;
``X-Session-End`` or ``DELETE /sessions/{id}`` frees that home. Admin calls
(pause/resume, weight reload, prefix-cache reset, ``/collective_rpc``) go to every engine at once.
TRL's NCCL weight-transfer endpoints answer 501: weights stream engine by engine, not through a
proxy. FastAPI is imported here, and this module only by ``rollout-plugin serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from rollout_plugin.errors import EngineError, PoolError
from rollout_plugin.gateway.batching import merge_completions, prompt_count, split_prompts
from rollout_plugin.gateway.native import NativeCompletion, completion_response, plan_completion
from rollout_plugin.gateway.relay import END, Exchange, Relay, gateway_request
from rollout_plugin.gateway.sessions import Session, SessionHeaderError, read_session, session_key
from rollout_plugin.gateway.streaming import EventStream
from rollout_plugin.pool import RolloutPool
from rollout_plugin.pool import FolderWeights, InPlaceWeights, WeightSource
from rollout_plugin.types import Request as PoolRequest
from rollout_plugin.types import Result

log = logging.getLogger(__name__)

NCCL_ROUTES = ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
               "/close_communicator", "/server_info")
NCCL_HELP = ("the gateway does not relay NCCL weight transfer (weights go to each engine directly): point the "
             "trainer's weight sync at the engines (engine.urls), or save the weights where the engines load "
             "them and POST /admin/reload_weights")
OPEN_ROUTES = ("/health",)  # probes need no key
GONE = object()  # the caller disconnected before its answer
CLIENT_GONE = 499  # nginx's "client closed request": logged, never read by anyone


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _failure(result: Result, error: tuple[int | None, str] | None) -> JSONResponse:
    """A failed request's answer: the engine's own 4xx (a bad request), else 502 with the last error."""
    status, text = error or (None, result.error or "no answer")
    if status is not None and 400 <= status < 500 and status != 429:
        return _error(status, text)
    return _error(502, f"no engine produced an answer after {result.attempts} attempt(s): {text}", "upstream_error")


def _session(request: Request) -> Session | None | JSONResponse:
    try:
        return read_session(request.headers)
    except SessionHeaderError as exc:
        return _error(400, str(exc))


def _count(value: Any) -> int:
    """``n`` as sent; anything else counts as 1 here (the engine rejects it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


async def _disconnected(request: Request) -> None:
    """Returns when the caller hangs up (its body is already read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    """Handlers over one running pool. ``model``: the name /v1/models reports and callers may send.
    ``pack_callers``: completions the pool can model go in as its own requests (:mod:`.native`)."""

    def __init__(self, pool: RolloutPool, relay: Relay, *, model: str, max_model_len: int, api_key: str | None,
                 world_size: int, pack_callers: bool = True):
        self.pool = pool
        self.relay = relay
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.world_size = world_size
        self.pack_callers = pack_callers
        self.created = int(time.time())

    # -- generation ------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        session = _session(request)
        if isinstance(session, JSONResponse):
            return session
        n = _count(body.get("n"))
        samples = prompt_count(body.get("prompt")) * n
        if body.get("stream"):  # one call, every prompt: vLLM numbers a multi-prompt stream's choices itself
            return await self._stream(request, "completions", body, samples, session)
        with self._ending(session):
            if session is not None:  # alone, unsplit, to the session's home: no pack holds it, no stranger in it
                return await self._whole(request, "completions", body, samples, session)
            return await self._packed_or_split(request, body, n)

    async def _packed_or_split(self, request: Request, body: dict[str, Any], n: int) -> Response:
        limits = self.pool.limits
        plan = plan_completion(body, min(limits.engine_inflight, limits.global_samples)) if self.pack_callers else None
        if plan is not None:
            return await self._native(request, plan)
        answers = await self._unless_gone(request, asyncio.gather(
            *(self._one("completions", part, n) for part in split_prompts(body))))
        if answers is GONE:
            return Response(status_code=CLIENT_GONE)
        for _, failure in answers:
            if failure is not None:
                return failure
        return JSONResponse(merge_completions([a for a, _ in answers], n))

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        session = _session(request)
        if isinstance(session, JSONResponse):
            return session
        if body.get("stream"):
            return await self._stream(request, "chat", body, _count(body.get("n")), session)
        with self._ending(session):
            return await self._whole(request, "chat", body, _count(body.get("n")), session)

    async def _whole(self, request: Request, route: str, body: dict[str, Any], samples: int,
                     session: Session | None) -> Response:
        """One body passed through as it is, in one call: the engine's answer."""
        answer = await self._unless_gone(request, self._one(route, body, samples, session))
        if answer is GONE:
            return Response(status_code=CLIENT_GONE)
        data, failure = answer
        return failure or JSONResponse(data)

    @contextlib.contextmanager
    def _ending(self, session: Session | None) -> Iterator[None]:
        """A session's last turn (``X-Session-End``) frees its home once the turn is over, however it ended."""
        try:
            yield
        finally:
            if session is not None and session.end:
                self._end(session.id, "its last turn is over")

    def _end(self, session_id: str, reason: str) -> bool:
        try:
            ended = self.pool.end_session(session_key(session_id))
        except PoolError as exc:  # the pool closed meanwhile: its map went with it
            log.debug("session %s: not ended (%s)", session_id, exc)
            return False
        log.debug("session %s: %s -> no home (%s)", session_id, "home" if ended else "no home", reason)
        return ended

    async def _unless_gone(self, request: Request, work: Awaitable[Any]) -> Any:
        """``work``'s value, or :data:`GONE` when the caller hangs up first; ``work`` is then cancelled, and with it
        its pool futures (the pool drops those requests and cancels their calls: their engine slots free up)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # its clean-up runs before we answer
        return GONE if task.cancelled() else task.result()

    def _submit(self, request: PoolRequest) -> asyncio.Future[Result] | JSONResponse:
        try:
            return self.pool.submit(request)
        except ValueError as exc:  # n beyond what one engine may hold
            return _error(400, str(exc))
        except PoolError as exc:
            return _error(503, f"the pool cannot take requests: {exc}", "service_unavailable")

    async def _one(self, route: str, body: dict[str, Any], samples: int, session: Session | None = None
                   ) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        """One pass-through body: the engine's whole answer, or the error to return."""
        request = gateway_request(route, body, samples, self.pool.limits.engine_inflight,
                                  affinity=session.key if session is not None else None)
        ex = self.relay.open(request.id)
        try:
            future = self._submit(request)
            if isinstance(future, JSONResponse):
                return None, future
            result = await future
        finally:  # a caller that hung up leaves nothing behind in the relay
            self.relay.close(request.id)
        if result.ok and ex.response is not None:
            return ex.response, None
        return None, _failure(result, ex.error)

    async def _native(self, request: Request, plan: NativeCompletion) -> Response:
        """A completion as pool requests (they pack with other callers'), answered from their results."""
        requests = plan.requests()
        exchanges = [self.relay.open(r.id) for r in requests]
        try:
            results = await self._unless_gone(request, self._results(requests))
        finally:
            for r in requests:
                self.relay.close(r.id)
        if results is GONE:
            return Response(status_code=CLIENT_GONE)
        if isinstance(results, JSONResponse):
            return results
        for result, ex in zip(results, exchanges):
            if not result.ok:
                return _failure(result, ex.error)
        return JSONResponse(completion_response(plan, results, [ex.prompt_ids for ex in exchanges],
                                                model=self.model, created=int(time.time())))

    async def _results(self, requests: list[PoolRequest]) -> list[Result] | JSONResponse:
        futures: list[asyncio.Future[Result]] = []
        for r in requests:
            future = self._submit(r)
            if isinstance(future, JSONResponse):
                for f in futures:
                    f.cancel()
                return future
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _stream(self, request: Request, route: str, body: dict[str, Any], samples: int,
                      session: Session | None) -> Response:
        """A streamed body (:mod:`.streaming`): a JSON error while nothing was sent, else the engine's events."""
        pool_request = gateway_request(route, body, samples, self.pool.limits.engine_inflight, stream=True,
                                       affinity=session.key if session is not None else None)
        ex = self.relay.open(pool_request.id, stream=True)
        future = self._submit(pool_request)
        if isinstance(future, JSONResponse):
            self.relay.close(pool_request.id)
            if session is not None and session.end:
                self._end(session.id, "its last turn was refused")
            return future
        future.add_done_callback(ex.end)
        if session is not None and session.end:  # the turn is over when the pool resolves it, streamed or cut
            future.add_done_callback(lambda _: self._end(session.id, "its last turn is over"))
        try:
            first = await self._unless_gone(request, ex.events.get())  # type: ignore[union-attr]
        except BaseException:
            future.cancel()
            self.relay.close(pool_request.id)
            raise
        if first is GONE or first is END:
            if not future.done():
                future.cancel()
            self.relay.close(pool_request.id)
            return Response(status_code=CLIENT_GONE) if first is GONE else self._unstarted(future, ex)
        return EventStream(self.relay, pool_request.id, ex, first, future)

    @staticmethod
    def _unstarted(future: asyncio.Future[Result], ex: Exchange) -> JSONResponse:
        """A stream that ended before its first event: the pool's verdict as an ordinary error answer."""
        if future.exception() is not None:
            return _error(503, f"the pool failed: {future.exception()}", "service_unavailable")
        result = future.result()
        return _failure(result, ex.error) if not result.ok else _error(502, "the engine sent no events",
                                                                        "upstream_error")

    async def _body(self, request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
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

    async def end_session(self, request: Request) -> JSONResponse:
        """``DELETE /sessions/{id}``: the session is over, its home engine freed now. ``ended`` false: it had
        none (never placed, expired by pool.affinity_ttl_s, pushed out by pool.affinity_max_keys, ended)."""
        session_id = request.path_params["session_id"]
        return JSONResponse({"session": session_id, "ended": self._end(session_id, "DELETE /sessions")})

    # -- admin -----------------------------------------------------------------------------------
    async def fan_out(self, path: str, body: dict[str, Any] | None) -> JSONResponse:
        answers = await self.pool.engine_rpc(path, body, timeout_s=60.0)
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
        try:
            self.pool.resume(int(version) if version is not None else None)
        except PoolError as exc:  # a weight update is under way: it resumes admission itself
            return _error(409, str(exc), "conflict")
        return JSONResponse({"paused": False, "weight_version": self.pool.weight_version})

    async def reload_weights(self, request: Request) -> JSONResponse:
        """Every engine reloads its model path in place, through the pool's one update sequence (drain, load,
        verify, adopt, resume): the next (or given) weight version only if every engine loaded it. A failure
        answers 502 and leaves the old version (engines that may hold other weights leave rotation until the
        next reload; :mod:`rollout_plugin.pool.weights.update`)."""
        body = await self._optional_body(request)
        version = body.get("weight_version")
        return await self._reload(InPlaceWeights(timeout_s=60.0), int(version) if version is not None else None)

    async def _reload(self, source: WeightSource, version: int | None) -> JSONResponse:
        try:
            adopted = await self.pool.update_weights(version, source)
        except EngineError as exc:
            return _error(502, f"reload_weights failed; weight version {self.pool.weight_version} stays: {exc}",
                          "upstream_error")
        return JSONResponse({"success": True, "weight_version": adopted})

    async def relay_admin(self, request: Request) -> JSONResponse:
        body = await self._optional_body(request)
        if request.url.path == "/collective_rpc" and body.get("method") == "reload_weights":
            # A weight load: through the pool's update sequence, or results would carry a version it did not verify.
            path = (body.get("kwargs") or {}).get("weights_path")
            timeout = body.get("timeout") if isinstance(body.get("timeout"), (int, float)) else 600.0
            return await self._reload(FolderWeights(path, timeout_s=timeout) if path else
                                      InPlaceWeights(timeout_s=timeout), None)
        return await self.fan_out(request.url.path, body)

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
    app.add_api_route("/sessions/{session_id}", gw.end_session, methods=["DELETE"])
    app.add_api_route("/admin/pause", gw.pause, methods=["POST"])
    app.add_api_route("/admin/resume", gw.resume, methods=["POST"])
    app.add_api_route("/admin/reload_weights", gw.reload_weights, methods=["POST"])
    for path in ("/reset_prefix_cache", "/collective_rpc", "/pause", "/resume"):
        app.add_api_route(path, gw.relay_admin, methods=["POST"])  # vLLM's own admin calls, to every engine
    for path in NCCL_ROUTES:
        app.add_api_route(path, gw.not_relayed, methods=["GET", "POST"])
    return app
