"""vLLM 0.32's server, in process and on virtual time, reached through the real :class:`HttpEngineClient`.

The pool's own HTTP client talks to :class:`FakeVllm` through :class:`FakeSession`, a stand-in for the
``aiohttp.ClientSession`` the client opens: the request bodies, SSE chunks, status codes and transport
errors are vLLM's wire shapes, and the verdict for each (``Unavailable``, an ok generation, ...) is whatever
``rollout_plugin/pool/transport/http.py`` makes of them today — so a parser that ignores an in-stream error shows up
as a truncated "ok" sample, as it would against a real server. Behaviours and the vLLM files they copy
(paths under ``vllm/``):

- Streamed completions: one chunk per choice per engine step, ``prompt_token_ids`` in a choice's first chunk,
  ``token_ids`` per delta, ``finish_reason`` on its last, a usage chunk with ``choices: []``, ``[DONE]``
  (``entrypoints/openai/completion/serving.py`` ``completion_stream_generator``). Chat: ``prompt_token_ids`` once,
  at the top level of the first chunk, beside a role delta (``entrypoints/openai/chat_completion/serving.py``);
  non-streamed chat answers carry them at the top level too (``chat_completion/protocol.py``).
- In-stream errors: a generation that fails after it streamed tokens ends the stream with
  ``data: {"error": {...}}`` then ``data: [DONE]`` under HTTP 200 (same file, ``except GenerationError`` and
  ``generate/base/serving.py`` ``_convert_generation_error_to_streaming_response``); non-streamed: HTTP 500.
- ``/pause?mode=abort|keep|wait``, ``/resume`` (``entrypoints/rl/online/api_router.py``,
  ``v1/engine/core.py`` ``pause_scheduler``): every mode QUEUES new requests until ``/resume``; ``abort`` ends
  running requests with finish reason ``abort`` and the tokens so far; ``keep`` freezes them; ``wait`` lets them
  finish before answering. A failing pause answers 500 ``{"error": "Failed to pause generation: ..."}``.
- ``/abort_requests`` (``entrypoints/rl/online/api_router.py``; ``v1/engine/output_processor.py``
  ``abort_requests``): the requests named end now, queued or running, each answered with its tokens so far and
  finish reason ``abort``; unknown ids are ignored. A request's id is what the serving layer makes of the caller's
  ``X-Request-Id`` (``entrypoints/serve/engine/serving.py`` ``_base_request_id``): ``cmpl-{id}-{i}`` per prompt
  (``openai/completion/serving.py``), ``chatcmpl-{id}`` for a chat.
- ``/collective_rpc`` ``reload_weights`` (``entrypoints/serve/dev/rpc/api_router.py``): a failure half-way
  leaves some layers new (the engine holds neither version) and answers 500.
- ``/update_weight_version``, ``GET /weight_info`` (the version string, ``"default"`` in a fresh process:
  ``v1/engine/core.py`` ``self._weight_version``), ``/weight_checker`` checksums, ``/reset_prefix_cache``.
- The version on each generation: vLLM stamps every engine output with the weights it was made under
  (``v1/engine/core.py`` ``_attach_weight_version``). Here each token encodes the weights that made it,
  ``token = 1000 × weights + position`` (weights ``-1``: a half-loaded model), so a test can check each
  sample's segments against its tokens.
- A restarted engine is a fresh process: initial weights (0), version ``"default"`` (:class:`FakeProvider`).
- A dead process: new connections refused, streams cut (``aiohttp.ClientPayloadError``), /health refused.
- Control calls take ``CONTROL_S`` (an HTTP round trip), token steps ``STEP_S``, a reload ``RELOAD_S``: all on the
  loop's (virtual) clock, so two updates, or a close and a ``/pause``, can interleave as on a real server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rollout_plugin.errors import EngineError
from rollout_plugin.pool.transport.http import HttpEngineClient
from rollout_plugin.pool.engines.launcher import EngineEndpoint

__all__ = ["CONTROL_S", "CORRUPT", "FakeCluster", "FakeProvider", "FakeSession", "FakeVllm", "RELOAD_S", "STEP_S",
           "weights_of"]

STEP_S = 0.01  # virtual seconds per engine step (one token per running sample)
RELOAD_S = 0.05  # a weight reload takes this long (long enough for another update to overlap it)
CONTROL_S = 0.001  # one HTTP round trip of a control call (/pause, /weight_info, /health …)
PAUSE_SETTLE_S = 0.02  # vllm/v1/engine/async_llm.py pause_generation: asyncio.sleep(0.02) after the pause
CORRUPT = -1  # the weights of a half-loaded model
MODEL = "fake-model"


def weights_of(token: int) -> int:
    """The weights that made ``token`` (see the module docstring)."""
    return (token + 1000) // 1000 - 1 if token < 0 else token // 1000


def _error_body(message: str, code: int = 500, kind: str = "InternalServerError") -> dict[str, Any]:
    # vllm/entrypoints/serve/engine/protocol.py ErrorResponse(error=ErrorInfo(...)).model_dump()
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class _Job:
    """One /v1/completions request inside the engine (all its prompts × n choices)."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    aborted: bool = False
    outs: list[list[int]] = field(default_factory=list)  # per choice (prompt_index × n + sample)


class FakeVllm:
    """One vLLM server process. Faults are armed by the test: ``pause_failures`` (next /pause calls answer
    500), ``reload_failures`` (next reloads fail half-way), ``stream_errors`` (the next calls fail after that
    many steps: an in-stream error event), ``always_error_after`` (every call does), ``resets_after`` (every
    call's connection is cut after that many steps: a proxy's idle timeout in front of the engine), ``poisoned``
    (every call fails once a sample reaches that output position: a repeatable server error)."""

    def __init__(self, name: str, url: str, weights: int = 0):
        self.name, self.url = name, url
        self.weights = weights
        self.version = "default"
        self.dead = False
        self.pause_mode: str | None = None
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self.running: list[_Job] = []
        self.by_id: dict[str, _Job] = {}  # queued and running requests by the id vLLM gives them (/abort_requests)
        self.generated = 0
        self.pause_failures = 0
        self.reload_failures = 0
        self.stream_errors: list[int] = []
        self.always_error_after: int | None = None
        self.resets_after: int | None = None  # a proxy in front cuts every call after this many steps
        self.poisoned: tuple[int, str] | None = None  # (position, "event" | "reset"): fails every sample there
        self.reported: set[str] = set()  # every version /weight_info answered
        self.holding: set[int] = {weights}  # every weights this process held (completed loads)

    # -- the data path ------------------------------------------------------------------------------
    def kill(self) -> None:
        """The process dies (SIGKILL, OOM): connections reset, queued and frozen requests with them."""
        self.dead = True
        self._unpaused.set()  # wake the waiters: they find the process gone

    async def _hold(self, frozen) -> None:
        while frozen() and not self.dead:
            await self._unpaused.wait()
        if self.dead:
            raise aiohttp.ClientPayloadError("Response payload is not completed")

    async def _admit(self) -> None:
        # core.py pause_scheduler: "All pause modes queue new adds" until resume_scheduler.
        await self._hold(lambda: self.pause_mode is not None)

    def _fault(self, job: _Job, step: int, error_at: int | None) -> str | None:
        """What breaks ``job`` at ``step``: "reset" (the connection goes) or "error" (an in-stream error event)."""
        if self.dead or (self.resets_after is not None and step >= self.resets_after):
            return "reset"
        if self.poisoned is not None and any(len(p) - 1 + step >= self.poisoned[0] for p in job.prompts):
            # A repeatable failure at one position (a bad token, a kernel bug at that length); "reset": the
            # engine core crashed and took the connection with it.
            return "reset" if self.poisoned[1] == "reset" else "error"
        return "error" if error_at is not None and step >= error_at else None

    def _error_step(self) -> int | None:
        if self.stream_errors:
            return self.stream_errors.pop(0)
        return self.always_error_after

    async def completions(self, body: dict[str, Any],
                          request_id: str | None = None) -> AsyncIterator[dict[str, Any] | str]:
        """The chunks of one streamed call (dicts), then "[DONE]"; raises ClientPayloadError if the process dies.
        A chat call (``messages``) is rendered to one token, the number its last message holds."""
        chat = "messages" in body
        if chat:
            prompts = [[int(body["messages"][-1]["content"])]]
        else:
            prompts = body["prompt"] if body["prompt"] and isinstance(body["prompt"][0], list) else [body["prompt"]]
        job = _Job([list(p) for p in prompts], int(body.get("n", 1)), int(body["max_tokens"]))
        job.outs = [[] for _ in range(len(job.prompts) * job.n)]
        ids = ([f"chatcmpl-{request_id}"] if chat else [f"cmpl-{request_id}-{i}" for i in range(len(job.prompts))]
               ) if request_id else []
        for rid in ids:
            self.by_id[rid] = job
        error_at = self._error_step()
        try:
            await self._admit()
        except BaseException:
            for rid in ids:
                self.by_id.pop(rid, None)
            raise
        self.running.append(job)
        try:
            for step in range(job.max_tokens):
                await self._hold(lambda: self.pause_mode == "keep" and not job.aborted)  # PAUSED_ALL: frozen
                if not job.aborted:
                    await asyncio.sleep(STEP_S)
                fault = self._fault(job, step, error_at)
                if fault == "reset":  # the process died, or a proxy cut the connection
                    raise aiohttp.ClientPayloadError("Response payload is not completed")
                if job.aborted:
                    break
                if fault == "error":  # completion/serving.py: `except GenerationError` -> an error event, [DONE]
                    yield _error_body("Internal server error")
                    yield "[DONE]"
                    return
                for c, out in enumerate(job.outs):
                    prompt = job.prompts[c // job.n]
                    token = 1000 * self.weights + len(prompt) - 1 + step  # prompts are [marker, *tokens so far]
                    out.append(token)
                    self.generated += 1
                    yield self._chunk(chat, c, f" t{token}", [token], "length" if step == job.max_tokens - 1 else None,
                                      prompt if step == 0 else None)
            if job.aborted:  # core.py finish_requests(FINISHED_ABORTED): final outputs, finish reason "abort"
                for c, out in enumerate(job.outs):
                    yield self._chunk(chat, c, "", [], "abort", None if out else job.prompts[c // job.n])
            prompt_tokens = sum(len(p) for p in job.prompts)
            done = sum(len(o) for o in job.outs)
            yield {"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": [],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                             "total_tokens": prompt_tokens + done}}
            yield "[DONE]"
        finally:
            self.running.remove(job)  # finished, or the client went away (vLLM aborts it)
            for rid in ids:
                self.by_id.pop(rid, None)

    @staticmethod
    def _chunk(chat: bool, index: int, text: str, tokens: list[int], finish: str | None,
               prompt: list[int] | None) -> dict[str, Any]:
        """One choice's delta. Completions send ``prompt_token_ids`` in a choice's first chunk
        (completion/serving.py); chat sends them once, at the top level of the first chunk, beside a role-only
        delta (chat_completion/serving.py: "return prompt_token_ids at the first chunk ever")."""
        if not chat:
            choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                                      "stop_reason": None, "token_ids": tokens}
            if prompt is not None:
                choice["prompt_token_ids"] = prompt
            return {"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": [choice]}
        delta = {"role": "assistant", "content": text} if prompt is not None else {"content": text}
        chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": MODEL,
                                 "choices": [{"index": index, "delta": delta, "logprobs": None,
                                              "finish_reason": finish, "token_ids": tokens}]}
        if prompt is not None:
            chunk["prompt_token_ids"] = prompt
        return chunk

    async def completion_whole(self, body: dict[str, Any],
                               request_id: str | None = None) -> tuple[int, dict[str, Any]]:
        """A non-streamed call: the same generation, answered at once (completion/serving.py
        request_output_to_completion_response); a generation error is HTTP 500 (``_raise_if_error``)."""
        choices: dict[int, dict[str, Any]] = {}
        usage: dict[str, Any] = {}
        top = None
        async for chunk in self.completions(body, request_id):
            if isinstance(chunk, str):
                continue
            if "error" in chunk:
                return 500, chunk
            usage = chunk.get("usage") or usage
            top = chunk.get("prompt_token_ids", top)
            for ch in chunk["choices"]:
                acc = choices.setdefault(ch["index"], {"index": ch["index"], "text": "", "token_ids": [],
                                                       "logprobs": None, "finish_reason": None})
                acc["text"] += ch["delta"]["content"] if "delta" in ch else ch["text"]
                acc["token_ids"] += ch["token_ids"]
                acc["finish_reason"] = ch["finish_reason"] or acc["finish_reason"]
                if "prompt_token_ids" in ch:
                    acc["prompt_token_ids"] = ch["prompt_token_ids"]
        ordered = [choices[i] for i in sorted(choices)]
        if "messages" in body:  # chat_completion/protocol.py ChatCompletionResponse: prompt ids at the top level
            for ch in ordered:
                ch["message"] = {"role": "assistant", "content": ch.pop("text")}
            return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": MODEL, "choices": ordered,
                         "usage": usage, "prompt_token_ids": top}
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": ordered,
                     "usage": usage}

    # -- the control routes (entrypoints/rl/online/api_router.py, serve/dev/*) ------------------------
    async def control(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        route, _, query = path.partition("?")
        params = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
        if route == "/health":
            return 200, None
        if route == "/v1/models":
            return 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        if route == "/metrics":
            return 200, (f'vllm:generation_tokens_total{{model_name="{MODEL}"}} {float(self.generated)}\n'
                         f'vllm:num_requests_running{{model_name="{MODEL}"}} {float(len(self.running))}\n')
        if route == "/abort_requests":
            ids = body.get("request_ids") or []
            for rid in ids:
                if rid in self.by_id:
                    self.by_id[rid].aborted = True
            return 200, {"status": "aborted", "aborted": len(ids)}
        if route == "/pause":
            return await self._pause(params.get("mode", "abort"))
        if route == "/resume":
            self.pause_mode = None  # core.py resume_scheduler: flush the requests queued while paused
            self._unpaused.set()
            return 200, {"status": "resumed"}
        if route == "/is_paused":
            return 200, {"is_paused": self.pause_mode is not None}
        if route == "/collective_rpc" and body.get("method") == "reload_weights":
            return await self._reload(str(body.get("kwargs", {}).get("weights_path", "")))
        if route == "/reset_prefix_cache":
            return 200, {"success": True}
        if route == "/update_weight_version":
            self.version = str(body["new_version"])
            return 200, {"success": True, "new_version": self.version}
        if route == "/weight_info":
            self.reported.add(self.version)
            return 200, {"weight_version": self.version}
        if route == "/weight_checker":
            return 200, {"checksums": {"model.weight": f"sha-{self.weights}"}}
        return 404, {"detail": "Not Found"}

    async def _pause(self, mode: str) -> tuple[int, Any]:
        if mode not in ("abort", "keep", "wait"):
            return 400, {"error": f"Invalid pause mode: {mode}"}
        if self.pause_failures:
            self.pause_failures -= 1
            return 500, {"error": "Failed to pause generation: engine core busy"}
        self.pause_mode = mode
        if not self.dead:
            self._unpaused.clear()
        if mode == "abort":
            for job in self.running:
                job.aborted = True
        elif mode == "wait":  # PAUSED_NEW, keep stepping until drained
            while self.running and not self.dead:
                await asyncio.sleep(STEP_S)
        await asyncio.sleep(PAUSE_SETTLE_S)
        return 200, {"status": "paused"}

    async def _reload(self, path: str) -> tuple[int, Any]:
        target = int(path.lstrip("w")) if path.lstrip("w").isdigit() else None
        if target is None:
            return 500, _error_body(f"no weights at {path!r}")
        await asyncio.sleep(RELOAD_S / 2)
        if self.reload_failures:
            self.reload_failures -= 1
            self.weights = CORRUPT  # some layers loaded, the rest not
            return 500, _error_body("reload_weights failed: CUDA error: an illegal memory access")
        await asyncio.sleep(RELOAD_S / 2)
        self.weights = target
        self.holding.add(target)
        return 200, {"results": [None]}


class _Content:
    def __init__(self, chunks: AsyncIterator[bytes]):
        self._chunks = chunks

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._chunks


class _Response:
    def __init__(self, status: int, body: bytes = b"", chunks: AsyncIterator[bytes] | None = None):
        self.status = status
        self.headers: dict[str, str] = {"content-type": "application/json"}
        self._body = body
        self.content = _Content(chunks) if chunks is not None else None

    async def read(self) -> bytes:
        return self._body


class _Exchange:
    """What ``session.request(...)`` returns: an async context manager around one exchange."""

    def __init__(self, session: FakeSession, method: str, url: str, data: bytes | None,
                 headers: dict[str, str] | None = None):
        self.session, self.method, self.url, self.data = session, method, url, data
        self.request_id = (headers or {}).get("X-Request-Id")
        self._gen: AsyncIterator[Any] | None = None

    async def __aenter__(self) -> _Response:
        server = self.session.server
        if server.dead:
            raise ConnectionRefusedError(111, f"Connect call failed ({server.url})")
        body = json.loads(self.data) if self.data else {}
        path = self.url[len(server.url):]
        if path in ("/v1/completions", "/v1/chat/completions"):
            if body.get("stream"):
                self._gen = server.completions(body, self.request_id)
                return _Response(200, chunks=self._sse(self._gen))
            status, answer = await server.completion_whole(body, self.request_id)
            if server.dead:
                raise aiohttp.ServerDisconnectedError()
            return _Response(status, json.dumps(answer).encode())
        await asyncio.sleep(CONTROL_S)
        status, answer = await server.control(self.method, path, body)
        if server.dead:
            raise aiohttp.ServerDisconnectedError()
        text = answer if isinstance(answer, str) else json.dumps(answer) if answer is not None else ""
        return _Response(status, text.encode())

    @staticmethod
    async def _sse(chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n".encode()

    async def __aexit__(self, *exc: object) -> None:
        if self._gen is not None:
            await self._gen.aclose()  # type: ignore[attr-defined]  # the client left: the engine drops it


class FakeSession:
    """Stands in for the ``aiohttp.ClientSession`` of one :class:`HttpEngineClient` (its ``_http``)."""

    def __init__(self, server: FakeVllm):
        self.server = server

    def request(self, method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
                **_: Any) -> _Exchange:
        return _Exchange(self, method, url, data, headers)

    def post(self, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
             **_: Any) -> _Exchange:
        return _Exchange(self, "POST", url, data, headers)

    async def close(self) -> None:
        pass


class FakeCluster:
    """The engine processes of one test, by URL; :meth:`client` is a ``RolloutPool(client_factory=...)``."""

    def __init__(self, *, stream: bool = True, stream_min_tokens: int | None = None):
        self.stream, self.stream_min_tokens = stream, stream_min_tokens
        self.servers: dict[str, FakeVllm] = {}
        self.current: dict[str, FakeVllm] = {}  # engine name -> its live process
        self._spawned = 0

    def spawn(self, name: str) -> FakeVllm:
        self._spawned += 1
        server = FakeVllm(name, f"http://{name}-{self._spawned}")
        self.servers[server.url] = self.current[name] = server
        return server

    def client(self, name: str, url: str, **kw: Any) -> HttpEngineClient:
        kw = {"api_key": None, "model": MODEL, "max_connections": 0, "connect_s": 1.0, "request_s": 60.0,
              "admission_s": 1.0, "health_s": 0.5, **kw,
              "stream": self.stream, "stream_min_tokens": self.stream_min_tokens}
        client = HttpEngineClient(name, url, **kw)
        client._http = FakeSession(self.servers[url])  # type: ignore[assignment]  # in-process transport
        return client

    def reported_versions(self) -> set[int]:
        return {int(v) for s in self.servers.values() for v in s.reported if v.lstrip("-").isdigit()}

    def held_weights(self) -> set[int]:
        return {w for s in self.servers.values() for w in s.holding}


class FakeProvider:
    """A backend whose ``replace`` starts a fresh process (initial weights) after ``restart_s``; it fails
    while ``failures`` > 0 (no resources)."""

    startup_s: list[float] = []

    def __init__(self, cluster: FakeCluster, restart_s: float = 0.5):
        self.cluster, self.restart_s = cluster, restart_s
        self.failures = 0
        self.restarts = 0

    async def replace(self, index: int) -> EngineEndpoint:
        name = f"e{index}"
        await asyncio.sleep(self.restart_s)
        if self.failures:
            self.failures -= 1
            raise EngineError(f"{name}: the replacement did not start (no free GPU)")
        self.restarts += 1
        return EngineEndpoint(name, self.cluster.spawn(name).url, None)

    async def watch(self, on_dead, on_capacity) -> None:
        return None

    def can_grow(self, engines: int) -> bool:
        return False

    async def add(self) -> EngineEndpoint:
        raise EngineError("the fake backend adds no engines")

    def close(self) -> None:
        pass
