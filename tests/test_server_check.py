"""The start-up check of an engine's vLLM version and endpoints: the real session engine, and small fake servers
for an old vLLM, one without dev mode, and a non-vLLM OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rollout_plugin.errors import EngineError
from rollout_plugin.pool.engines.server_check import (
    DEV_MODE_ENDPOINTS,
    ENDPOINTS,
    VLLM_FLOOR,
    WEIGHT_SYNC_ENDPOINTS,
    check_server,
    check_servers,
    parse_version,
)


class FakeServer:
    """``/version`` answers ``version`` (None: 404); ``routes`` maps path -> method, answered like FastAPI does."""

    def __init__(self, version: str | None, routes: dict[str, str] | None = None, key: str | None = None):
        fake = self
        self.seen: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str) -> None:
                fake.seen.append((method, self.path))
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    return self._send(401, {"error": "unauthorized"})
                if self.path == "/version" and version is not None:
                    return self._send(200, {"version": version})
                route = (routes or {}).get(self.path)
                if route is None:
                    return self._send(404, {"detail": "Not Found"})
                if route != method:
                    return self._send(405, {"detail": "Method Not Allowed"})
                return self._send(200, {"weight_version": "default"})

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


ALL_ROUTES = {path: e.method for path, e in ENDPOINTS.items()}


def test_parse_version():
    assert parse_version("0.32.0") == (0, 32, 0)
    assert parse_version("0.32.1.dev5+gabc123") == (0, 32, 1)
    assert parse_version("v0.11") == (0, 11, 0)
    assert parse_version("dev") is None


async def test_an_old_server_is_refused_in_one_line_naming_engine_version_floor_and_fix():
    with FakeServer("0.11.0", ALL_ROUTES) as srv:
        with pytest.raises(EngineError) as info:
            await check_server("engine1", srv.url + "/v1", needs=WEIGHT_SYNC_ENDPOINTS)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"engine1 ({srv.url}): vLLM 0.11.0 is older than {VLLM_FLOOR}")
    assert "/collective_rpc for reload_weights(weights_path=...)" in text
    assert f"pip install 'vllm>={VLLM_FLOOR}'" in text
    assert srv.seen == [("GET", "/version")]  # refused before probing anything


async def test_a_server_without_dev_mode_is_refused_naming_the_missing_endpoints():
    with FakeServer(VLLM_FLOOR, {"/weight_info": "GET"}) as srv:
        with pytest.raises(EngineError) as info:
            await check_server("engine0", srv.url, needs=("/weight_info", "/pause", "/collective_rpc"))
    text = str(info.value)
    assert f"vLLM {VLLM_FLOOR} has no /pause (draining before a weight sync); /collective_rpc" in text
    assert "VLLM_SERVER_DEV_MODE=1 (engine.dev_mode=true" in text and "/weight_info (" not in text
    # Probing never POSTs: a POST-only route is sent a GET (405 there, 404 missing).
    assert {m for m, _ in srv.seen} == {"GET"}


async def test_generation_only_accepts_an_old_vllm_and_a_non_vllm_server(caplog):
    with FakeServer("0.11.0") as old, FakeServer(None) as hosted:
        assert (await check_server("engine0", old.url)).version == "0.11.0"
        assert (await check_server("engine1", hosted.url)).version is None
        with pytest.raises(EngineError, match="engine1 .*: no /version: not a vLLM server"):
            await check_server("engine1", hosted.url, needs=DEV_MODE_ENDPOINTS)
    assert "generation works, weight sync would not" in caplog.text


async def test_a_wrong_key_and_an_unreachable_server_are_one_line_each():
    with FakeServer(VLLM_FLOOR, ALL_ROUTES, key="right") as srv:
        with pytest.raises(EngineError, match="answered 401: the API key is wrong or missing"):
            await check_server("engine0", srv.url, api_key="wrong")
        info = await check_server("engine0", srv.url, api_key="right", needs=WEIGHT_SYNC_ENDPOINTS)
        assert info.version == VLLM_FLOOR
        url = srv.url
    with pytest.raises(EngineError, match=r"engine0 \(.*\): unreachable while checking its version"):
        await check_server("engine0", url, needs=("/weight_info",), timeout_s=2)
    # Generation only: an unreachable engine is the pool's to mark dead (failover), not a refusal at start.
    assert (await check_server("engine0", url, timeout_s=2)).version is None


async def test_check_servers_raises_the_first_failing_engine():
    with FakeServer(VLLM_FLOOR, ALL_ROUTES) as good, FakeServer("0.20.1", ALL_ROUTES) as old:
        with pytest.raises(EngineError, match=r"^engine1 .*vLLM 0\.20\.1 is older"):
            await check_servers([("engine0", good.url, None), ("engine1", old.url, None)],
                                needs=("/weight_info",))


async def test_unknown_endpoint_names_are_a_programming_error():
    with pytest.raises(ValueError, match="unknown endpoints"):
        await check_server("engine0", "http://127.0.0.1:1", needs=("/weights",))


@pytest.mark.engine
async def test_the_real_engine_passes_with_every_endpoint_the_pool_calls(live_engine):
    info = await check_server("engine0", live_engine.url, api_key=live_engine.api_key, needs=tuple(ENDPOINTS))
    assert parse_version(info.version) >= parse_version(VLLM_FLOOR)
