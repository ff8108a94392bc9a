"""A small OpenAI-compatible HTTP server of the tests' own that misbehaves on cue.

Real sockets and real HTTP, for faults a vLLM engine can't be made to produce on demand:
500s, 429s with Retry-After, garbage bodies, answers with a choice missing, connections dropped without an
answer, responses slower than the client's timeout, and a generation that fails after it began streaming.

A streamed call (``stream: true``) that is answered ``ok`` or ``error-event`` gets SSE as vLLM 0.32 sends it
(``vllm/entrypoints/openai/completion/serving.py`` ``completion_stream_generator``): chunks of choices, then
``[DONE]``; a failure mid-generation stays HTTP 200 and ends the stream with ``data: {"error": {...}}`` then
``data: [DONE]`` (its ``except GenerationError`` / ``except Exception``; the body is
``vllm/entrypoints/serve/engine/protocol.py`` ``ErrorResponse``). The other faults answer a streamed call as
they answer any call.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _sse(choices: list[dict], error: bool) -> bytes:
    """The SSE body of a streamed call: each choice whole, or (``error``) its first token and then vLLM's error."""
    if error:
        events = [{"choices": [{**c, "token_ids": c["token_ids"][:1], "finish_reason": None}]} for c in choices]
        events.append({"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root "
                                            "cause.", "type": "InternalServerError", "param": None, "code": 500}})
    else:
        events = [{"choices": [c]} for c in choices] + [{"choices": [], "usage": {"prompt_tokens": 2}}]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


class FaultServer:
    """``with FaultServer(["500", "ok"]) as srv: srv.url``; script entries are consumed per completion call:
    ``ok``, ``500``, ``429:<retry-after>``, ``garbage``, ``short`` (one choice too few), ``drop`` (close the
    connection without an answer), ``slow:<seconds>``, ``error-event`` (streamed: one token per choice, then an
    in-stream error, code 500); when empty, ``ok``."""

    def __init__(self, script: list[str] | None = None):
        self.script: deque[str] = deque(script or [])
        self.calls: list[tuple[float, str]] = []  # (monotonic time, behaviour)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                try:
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left ("slow")
                    self.close_connection = True

            def do_GET(self):
                if self.path in ("/health", "/v1/models"):
                    self._send(200, json.dumps({"data": [{"id": "fault"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    action = server.script.popleft() if server.script else "ok"
                    server.calls.append((time.monotonic(), action))
                kind, _, arg = action.partition(":")
                if kind == "500":
                    return self._send(500, b'{"error": "boom"}')
                if kind == "429":
                    return self._send(429, b'{"error": "slow down"}', {"Retry-After": arg or "1",
                                                                       "Content-Type": "application/json"})
                if kind == "garbage":
                    return self._send(200, b"\x00not json{{")
                if kind == "drop":
                    self.close_connection = True
                    return None
                if kind == "slow":
                    time.sleep(float(arg))  # the fault itself: a server slower than the client's timeout
                prompts = body["prompt"] if isinstance(body.get("prompt"), list) else [body.get("prompt")]
                n = body.get("n", 1)
                choices = [{"index": i * n + j, "text": f"answer {i}.{j}", "token_ids": [1, 2, 3],
                            "prompt_token_ids": [9, 9], "finish_reason": "stop"}
                           for i in range(len(prompts)) for j in range(n)]
                if kind == "short":
                    choices.pop()
                if body.get("stream") and kind in ("ok", "error-event"):
                    return self._send(200, _sse(choices, kind == "error-event"), {"Content-Type": "text/event-stream"})
                self._send(200, json.dumps({"choices": choices, "usage": {"prompt_tokens": 2}}).encode())

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
