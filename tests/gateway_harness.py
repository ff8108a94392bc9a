"""The gateway in-process for tests: uvicorn on this loop in front of a pool, and a scripted vLLM-shaped echo engine.

:func:`running_gateway` serves a :class:`Gateway` on a free port (a real socket: streaming and disconnects behave as
in production). :class:`EchoEngine` answers ``/v1/completions`` and ``/v1/chat/completions`` (JSON or SSE, multi-prompt
and ``n`` aware) with text derived from each prompt, so every caller can check it got its own answer; a script shared
by several engines makes calls fail on cue (``500``, ``die:K``: K events then the connection drops, ``hold``: wait
until the caller goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from aiohttp import web

from rollout_plugin.gateway.app import Gateway, build_app


@contextlib.asynccontextmanager
async def running_gateway(gw: Gateway) -> AsyncIterator[str]:
    """Serve ``gw`` on 127.0.0.1 (a free port) on this loop; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    started = asyncio.Event()

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            started.set()

    server = Server(uvicorn.Config(build_app(gw), log_level="warning", access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await asyncio.wait((task, asyncio.ensure_future(started.wait())), timeout=30,
                           return_when=asyncio.FIRST_COMPLETED)
        assert started.is_set(), "the gateway did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


async def eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Polls ``condition`` until it holds (a state the pool reaches asynchronously, with no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # polling a condition with a deadline


def _prompt_ids(prompt: Any) -> list[int]:
    return list(prompt) if isinstance(prompt, list) else [ord(c) for c in prompt]


class EchoEngine:
    """A vLLM-shaped engine whose sample ``j`` of prompt ``p`` is ``"<p>/<j>"`` (a token prompt: its ids joined by
    ``.``); ``calls``: (engine, path, body) of every generation call, shared by engines built with the same list."""

    def __init__(self, name: str, script: deque[str], calls: list[tuple[str, str, dict]]):
        self.name, self.script, self.calls = name, script, calls
        self.held = asyncio.Event()  # a "hold" call is waiting
        self.released = asyncio.Event()  # a "hold" call's caller went away (its connection closed)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/health", self.health)
        return app

    @staticmethod
    async def health(request: web.Request) -> web.Response:
        return web.Response()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)  # a hold sees its caller go
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.calls.append((self.name, request.path, body))
        action = self.script.popleft() if self.script else "ok"
        if action == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        chat = request.path.endswith("/chat/completions")
        choices = self._choices(body, chat)
        if not body.get("stream"):
            if action == "hold":
                await self._hold()
            return web.json_response({"id": "cmpl-echo", "object": "text_completion", "model": body["model"],
                                      "choices": choices, "usage": self._usage(body, choices)})
        return await self._stream(request, body, choices, chat, action)

    async def _hold(self) -> None:
        self.held.set()
        try:
            await asyncio.Event().wait()  # until the caller's connection closes (the handler is cancelled)
        finally:
            self.released.set()

    def _choices(self, body: dict, chat: bool) -> list[dict]:
        n = int(body.get("n") or 1)
        if chat:
            return [{"index": j, "message": {"role": "assistant", "content": f"reply/{j}"}, "finish_reason": "length",
                     "token_ids": [j]} for j in range(n)]
        prompt = body["prompt"]
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        return [{"index": i * n + j, "text": f"{_name(p)}/{j}", "logprobs": None, "finish_reason": "length",
                 "stop_reason": None, "token_ids": [len(_prompt_ids(p)), j], "prompt_token_ids": _prompt_ids(p)}
                for i, p in enumerate(prompts) for j in range(n)]

    @staticmethod
    def _usage(body: dict, choices: list[dict]) -> dict:
        prompt = sum(len(c.get("prompt_token_ids") or [1]) for c in choices) // max(1, int(body.get("n") or 1))
        completion = 2 * len(choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _stream(self, request: web.Request, body: dict, choices: list[dict], chat: bool,
                      action: str) -> web.StreamResponse:
        """Per choice: its text in two events (the second with the finish reason); usage if asked; ``[DONE]``."""
        events = []
        for c in choices:
            text = c["message"]["content"] if chat else c["text"]
            head, tail = text.split("/")
            for piece, reason in ((head, None), ("/" + tail, c["finish_reason"])):
                delta = {"delta": {"content": piece}} if chat else {"text": piece}
                events.append({"id": "echo", "choices": [{"index": c["index"], **delta, "finish_reason": reason}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": "echo", "choices": [], "usage": self._usage(body, choices)})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        kind, _, arg = action.partition(":")
        for k, event in enumerate(events):
            if kind == "die" and k == int(arg):
                assert request.transport is not None
                request.transport.abort()  # the engine dies mid-stream: no more bytes, no [DONE]
                return resp
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            if kind == "hold":
                await self._hold()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _name(prompt: Any) -> str:
    return ".".join(map(str, prompt)) if isinstance(prompt, list) else prompt
