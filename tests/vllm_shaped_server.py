"""A minimal vLLM-shaped OpenAI server that answers at once: for transport tests and benchmarks/transport.py.

    .venv/bin/python tests/vllm_shaped_server.py [--port 0] [--model shaped]   # prints "READY <url>"

``/v1/completions`` (multi-prompt and ``n`` aware, JSON or SSE with ``stream``), ``/v1/chat/completions``,
``/health``, ``/version``, ``/v1/models`` and a ``/metrics`` with vLLM's counter names, all answered as
vLLM 0.32 shapes them. Streamed text is written as raw UTF-8 (as vLLM does) and holds U+2028 and U+0085, which line
splitters break on. A :class:`Hold` keeps completion calls open until released, counting how many it
holds at once. In-process (:func:`serve`) for tests; one process per server (:func:`spawn`) for
benchmarks, so the server's CPU is not counted as the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web

VLLM_VERSION = "0.32.0"  # the shapes below are vLLM 0.32's
STREAM_TAIL = "\u2028\x85end"  # separators a line splitter would cut the event at


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
        if self.hold is not None:
            await self.hold.enter()
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._begin(request)
        prompts = body.get("prompt")
        prompts = prompts if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else [prompts]
        self.prompts += len(prompts)
        n, out = int(body.get("n", 1)), min(self.tokens, int(body.get("max_tokens") or 16))
        choices = [{"index": i * n + j, "text": f"answer {i}.{j}", "logprobs": None, "finish_reason": "length",
                    "stop_reason": None, "token_ids": list(range(out)), "prompt_logprobs": None,
                    "prompt_token_ids": [1, 2, 3]} for i in range(len(prompts)) for j in range(n)]
        self.generated += out * len(choices)
        usage = {"prompt_tokens": 3 * len(prompts), "total_tokens": 3 * len(prompts) + out * len(choices),
                 "completion_tokens": out * len(choices), "prompt_tokens_details": None}
        head = {"id": "cmpl-shaped", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            return await self._stream(request, head, choices, usage)
        return web.Response(body=json.dumps({**head, "choices": choices, "usage": usage,
                                             "kv_transfer_params": None}).encode(), content_type="application/json")

    async def _stream(self, request: web.Request, head: dict[str, Any], choices: list[dict[str, Any]],
                      usage: dict[str, Any]) -> web.StreamResponse:
        """Each choice in two chunks (text, then the separator tail with the finish reason), then usage, then [DONE]."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for c in choices:
            first = {**c, "finish_reason": None, "token_ids": c["token_ids"][:1]}
            last = {**c, "text": STREAM_TAIL, "token_ids": c["token_ids"][1:]}
            del last["prompt_token_ids"]  # vLLM sends them once, in a choice's first chunk
            for part in (first, last):
                event = json.dumps({**head, "choices": [part], "usage": None}, ensure_ascii=False)
                await resp.write(f"data: {event}\n\n".encode())
        await resp.write(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.Response:
        body = await self._begin(request)
        self.prompts += 1
        n, out = int(body.get("n", 1)), min(self.tokens, int(body.get("max_tokens") or 16))
        self.generated += out * n
        choices = [{"index": j, "message": {"role": "assistant", "content": f"reply {j}"}, "logprobs": None,
                    "finish_reason": "length", "token_ids": list(range(out)), "prompt_token_ids": [1, 2, 3]}
                   for j in range(n)]
        return web.json_response({"id": "chatcmpl-shaped", "object": "chat.completion", "model": body["model"],
                                  "choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": out * n,
                                                                "total_tokens": 3 + out * n}})

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
