"""A minimal vLLM-shaped OpenAI server that answers at once: for transport tests and benchmarks/transport.py.

    .venv/bin/python tests/vllm_shaped_server.py [--port 0] [--model shaped]   # prints "READY <url>"

``/v1/completions`` (multi-prompt and ``n`` aware, JSON or SSE with ``stream``), ``/v1/chat/completions`` (JSON or
SSE), ``/health``, ``/version``, ``/v1/models`` and a ``/metrics`` with vLLM's counter names, all answered as
vLLM 0.32 shapes them. Streamed text is written as raw UTF-8 (as vLLM does) and holds U+2028 and U+0085, which line
splitters break on. A :class:`Hold` keeps completion calls open until released, counting how many it
holds at once. In-process (:func:`serve`) for tests; one process per server (:func:`spawn`) for
benchmarks, so the server's CPU is not counted as the client's.

vLLM shapes copied (paths under ``vllm/entrypoints/``):

- a completion's ``prompt_token_ids`` per choice, in its first streamed chunk (``openai/completion/protocol.py``
  ``CompletionResponseStreamChoice``); a chat answer's at the TOP level of the response and of each choice's first
  streamed chunk (``openai/chat_completion/protocol.py`` ``ChatCompletionResponse`` / ``ChatCompletionStreamResponse``,
  ``openai/chat_completion/serving.py`` "return prompt_token_ids at the first chunk ever");
- a generation that fails once its stream began (the engine core died, ``finish_reason == "error"``): HTTP 200
  stays, the stream ends with ``data: {"error": {...}}`` then ``data: [DONE]`` (``openai/completion/serving.py``
  ``completion_stream_generator`` ``except GenerationError`` / ``except Exception``, the chat twin in
  ``openai/chat_completion/serving.py``; the body is ``serve/engine/protocol.py`` ``ErrorResponse``, its ``code``
  the status ``serve/exception_handling/error_response.py`` picks: 500 engine errors, 503 retryable, 400 a bad
  request). Armed per call with :class:`StreamFault`.

Tokens: the text prompt's ids are ``[1, 2, 3]`` (a chat prompt's ``[7, 8, 9]``); output token ``t`` of a sample is
its position, counted on from a token-id prompt's fourth id, so a sample continued from its prompt ids and its
tokens so far goes on where it stopped (a whole 8-token sample is ``0..7`` however often it was cut).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

VLLM_VERSION = "0.32.0"  # the shapes below are vLLM 0.32's
STREAM_TAIL = "\u2028\x85end"  # separators a line splitter would cut the event at
TEXT_PROMPT_IDS = [1, 2, 3]
CHAT_PROMPT_IDS = [7, 8, 9]


@dataclass(frozen=True)
class StreamFault:
    """The next streamed call fails after ``after`` tokens per choice: an error event, then ``[DONE]``.
    ``flat``: the pre-``ErrorResponse`` shape ``{"object": "error", "message", "type", "code"}``. ``silent``: no
    error event, only ``[DONE]`` — not vLLM's own behaviour but a proxy's that ends a body cleanly: samples that
    lack a finish reason."""

    after: int
    code: int = 500
    message: str = "EngineCore encountered an issue. See stack trace (above) for the root cause."
    kind: str = "InternalServerError"
    flat: bool = False
    silent: bool = False

    def event(self) -> dict[str, Any]:
        if self.flat:
            return {"object": "error", "message": self.message, "type": self.kind, "param": None, "code": self.code}
        # vllm/entrypoints/serve/engine/protocol.py ErrorResponse(error=ErrorInfo(...)).model_dump()
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


class Hold:
    """Completion calls wait in :meth:`enter` until :meth:`release`; ``held`` / ``peak``: calls held now / at most."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0
        self._released = asyncio.Event()
        self._changed = asyncio.Condition()

    async def enter(self) -> None:
        async with self._changed:
            self.held += 1
            self.peak = max(self.peak, self.held)
            self._changed.notify_all()
        try:
            await self._released.wait()
        finally:
            self.held -= 1

    async def holding(self, count: int) -> None:
        """Return once ``count`` calls are held at the same time."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.held >= count)

    def release(self) -> None:
        self._released.set()


class ShapedServer:
    """The server's state: what it was asked (``calls``, ``prompts``) and over which connections (``peers``)."""

    def __init__(self, model: str = "shaped", hold: Hold | None = None, tokens: int = 4):
        self.model = model
        self.hold = hold
        self.tokens = tokens  # output tokens per sample (max_tokens caps it)
        self.calls = 0
        self.prompts = 0
        self.generated = 0
        self.peers: set[Any] = set()  # client (host, port) pairs: one per connection used
        self.bodies: list[dict[str, Any]] = []  # every generate call's body, in order
        self.faults: deque[StreamFault] = deque()  # consumed one per streamed call (completions or chat)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/version", self.version)
        return app

    async def _begin(self, request: web.Request) -> dict[str, Any]:
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        self.calls += 1
        body = await request.json()
        self.bodies.append(body)
        if self.hold is not None:
            await self.hold.enter()
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._begin(request)
        prompts = body.get("prompt")
        prompts = prompts if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else [prompts]
        self.prompts += len(prompts)
        n, budget = int(body.get("n", 1)), int(body.get("max_tokens") or 16)
        ids = [p if isinstance(p, list) else TEXT_PROMPT_IDS for p in prompts]
        choices = [{"index": i * n + j, "text": f"answer {i}.{j}", "logprobs": None, "finish_reason": "length",
                    "stop_reason": None, "token_ids": self._output(ids[i], budget), "prompt_logprobs": None,
                    "prompt_token_ids": ids[i]} for i in range(len(prompts)) for j in range(n)]
        out = sum(len(c["token_ids"]) for c in choices)
        self.generated += out
        usage = {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids)) + out,
                 "completion_tokens": out, "prompt_tokens_details": None}
        head = {"id": "cmpl-shaped", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            return await self._stream(request, head, choices, usage)
        return web.Response(body=json.dumps({**head, "choices": choices, "usage": usage,
                                             "kv_transfer_params": None}).encode(), content_type="application/json")

    def _output(self, prompt_ids: list[int], budget: int) -> list[int]:
        """A sample's tokens: positions, on from what a continued prompt already holds (see the module docstring)."""
        start = max(0, len(prompt_ids) - 3)
        return list(range(start, start + min(self.tokens - start, budget)))

    async def _stream(self, request: web.Request, head: dict[str, Any], choices: list[dict[str, Any]],
                      usage: dict[str, Any], top: dict[str, Any] | None = None) -> web.StreamResponse:
        """Each choice in two chunks (text, then the separator tail with the finish reason), then usage, then [DONE];
        or, under a :class:`StreamFault`, each choice's first tokens, then the error event, then [DONE].
        ``top``: fields of each choice's first chunk at the top level (the chat API's ``prompt_token_ids``)."""
        fault = self.faults.popleft() if self.faults else None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())

        for c in choices:
            cut = 1 if fault is None else fault.after
            first = {**c, "finish_reason": None, "token_ids": c["token_ids"][:cut]}
            last = {**c, "token_ids": c["token_ids"][cut:]}
            last.pop("prompt_token_ids", None)  # vLLM sends them once, in a choice's first chunk
            last["text" if "text" in c else "delta"] = STREAM_TAIL if "text" in c else {"content": STREAM_TAIL}
            if fault is None or fault.after:  # a call failed before its first output sends only the error
                await send({**head, **(top or {}), "choices": [first], "usage": None})
            if fault is None:
                await send({**head, "choices": [last], "usage": None})
        if fault is not None:  # completion_stream_generator: except GenerationError / Exception -> error, [DONE]
            if not fault.silent:
                await send(fault.event())
        else:
            await send({**head, "choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._begin(request)
        self.prompts += 1
        n, budget = int(body.get("n", 1)), int(body.get("max_tokens") or 16)
        tokens = self._output(CHAT_PROMPT_IDS, budget)
        self.generated += len(tokens) * n
        usage = {"prompt_tokens": len(CHAT_PROMPT_IDS), "completion_tokens": len(tokens) * n,
                 "total_tokens": len(CHAT_PROMPT_IDS) + len(tokens) * n}
        head = {"id": "chatcmpl-shaped", "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):  # the chat API's prompt ids: at the top level of a choice's first chunk
            choices = [{"index": j, "delta": {"role": "assistant", "content": f"reply {j}"}, "logprobs": None,
                        "finish_reason": "length", "token_ids": tokens} for j in range(n)]
            return await self._stream(request, {**head, "object": "chat.completion.chunk"}, choices, usage,
                                      top={"prompt_token_ids": CHAT_PROMPT_IDS})
        choices = [{"index": j, "message": {"role": "assistant", "content": f"reply {j}"}, "logprobs": None,
                    "finish_reason": "length", "token_ids": tokens} for j in range(n)]
        return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage,
                                  "prompt_token_ids": CHAT_PROMPT_IDS})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        held = self.hold.held if self.hold is not None else 0
        labels = f'{{model_name="{self.model}"}}'
        text = "".join(f"# TYPE vllm:{name} {kind}\nvllm:{name}{labels} {value}\n" for name, kind, value in (
            ("num_requests_running", "gauge", held), ("num_requests_waiting", "gauge", 0),
            ("generation_tokens_total", "counter", self.generated),
            ("prompt_tokens_total", "counter", 3 * self.prompts)))
        return web.Response(text=text, content_type="text/plain")


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run any aiohttp app on this loop; yields its URL (``http://host:port``)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(server: ShapedServer, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run ``server`` on this loop; yields its URL."""
    async with serve_app(server.app(), host, port) as url:
        try:
            yield url
        finally:
            if server.hold is not None:
                server.hold.release()  # held handlers would keep the runner's cleanup waiting


@contextlib.contextmanager
def spawn(count: int, model: str = "shaped") -> Iterator[list[str]]:
    """``count`` servers, one process each; yields their URLs and stops them on exit."""
    procs = [subprocess.Popen([sys.executable, __file__, "--model", model], stdout=subprocess.PIPE, text=True)
             for _ in range(count)]
    try:
        urls = []
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("READY "):
                raise RuntimeError(f"vLLM-shaped server did not start (exit code {proc.poll()})")
            urls.append(line.split()[1])
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


async def _main(args: argparse.Namespace) -> None:
    async with serve(ShapedServer(args.model), args.host, args.port) as url:
        print("READY", url, flush=True)
        await asyncio.Event().wait()  # until terminated


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="shaped")
    try:
        asyncio.run(_main(parser.parse_args()))
    except KeyboardInterrupt:
        pass
