"""Is this engine a vLLM server new enough for what the pool will ask of it? Checked once, at start.

An older server fails deep inside the first weight sync (``reload_weights`` without ``weights_path``,
no ``/weight_info``); a server without ``VLLM_SERVER_DEV_MODE`` answers 404 to ``/pause``. This module
reads ``GET /version`` and probes the endpoints the pool needs, and says in one line which engine, which
version, which floor and what to do.

Probing has no side effects: a GET route is called (``/weight_info``), a POST-only route is sent a GET,
which FastAPI answers 405 (route there, wrong method) or 404 (no such route).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import httpx

from rollout_plugin.errors import EngineError
from rollout_plugin.pool.transport.http import split_base_url

__all__ = ["DEV_MODE_ENDPOINTS", "ENDPOINTS", "VLLM_FLOOR", "WEIGHT_SYNC_ENDPOINTS", "ServerInfo", "check_server",
           "check_servers", "parse_version"]

log = logging.getLogger(__name__)

# The oldest vLLM with every server API the pool calls; pyproject's `vllm` extra says the same. The newest of
# them: /weight_checker (vllm#51350, after 0.28) and /weight_info + /update_weight_version (vllm#49040); 0.32.0
# is the first release we have read and run them in.
VLLM_FLOOR = "0.32.0"


@dataclass(frozen=True)
class Endpoint:
    method: str  # "GET" or "POST"
    use: str  # what the pool calls it for (the error names it)


# Every server-root endpoint the pool may call, all behind VLLM_SERVER_DEV_MODE=1.
ENDPOINTS: dict[str, Endpoint] = {
    "/collective_rpc": Endpoint("POST", "reload_weights(weights_path=...) on every worker"),
    "/reset_prefix_cache": Endpoint("POST", "dropping cached prefixes of old weights"),
    "/pause": Endpoint("POST", "draining before a weight sync"),
    "/resume": Endpoint("POST", "resuming after a weight sync"),
    "/abort_requests": Endpoint("POST", "aborting in-flight requests"),
    "/update_weight_version": Endpoint("POST", "tagging the engine's weights with the pool's version"),
    "/weight_info": Endpoint("GET", "reading the engine's weight version back"),
    "/weight_checker": Endpoint("POST", "comparing weight checksums across engines"),
}
DEV_MODE_ENDPOINTS = ("/collective_rpc", "/reset_prefix_cache", "/pause", "/resume")
WEIGHT_SYNC_ENDPOINTS = ("/pause", "/resume", "/collective_rpc", "/abort_requests", "/update_weight_version",
                         "/weight_info", "/weight_checker")
FIX = "pip install 'vllm>={floor}' on that server"


@dataclass(frozen=True)
class ServerInfo:
    name: str
    url: str
    version: Optional[str]  # None: the server has no /version (not vLLM, or a proxy in front)


def parse_version(text: str) -> Optional[tuple[int, int, int]]:
    """``0.32.0``, ``0.32.1.dev5+gabc``, ``v0.32`` -> (0, 32, x); None for anything else (``dev``)."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


async def check_server(name: str, url: str, *, api_key: Optional[str] = None, needs: Sequence[str] = (),
                       floor: str = VLLM_FLOOR, timeout_s: float = 10.0) -> ServerInfo:
    """Read ``/version``; with ``needs`` (endpoints of :data:`ENDPOINTS`) refuse a server older than ``floor``
    or lacking one of them. Raises :class:`EngineError` with one line; returns what the server said.

    Without ``needs`` (generation only) nothing is refused: an older vLLM or another OpenAI-compatible
    server generates fine, and is logged.
    """
    unknown = [e for e in needs if e not in ENDPOINTS]
    if unknown:
        raise ValueError(f"check_server: unknown endpoints {unknown} (known: {', '.join(ENDPOINTS)})")
    root, _ = split_base_url(url)
    where = f"{name} ({root})"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=timeout_s) as http:
        version = await _version(http, where, bool(needs), floor)
        if needs:
            _refuse_old(where, version, floor, needs)
            answers = await asyncio.gather(*(_probe(http, where, path) for path in needs))
            missing = [path for path, present in zip(needs, answers) if not present]
            if missing:
                raise EngineError(_missing_line(where, version, floor, missing))
    if version is None:
        log.info("%s: no /version (not vLLM, or behind a proxy); generation only, nothing to check", where)
    elif needs:
        log.info("%s: vLLM %s, has %s", where, version, ", ".join(needs))
    elif (parse_version(version) or (0, 0, 0)) < (parse_version(floor) or (0, 0, 0)):
        log.warning("%s: vLLM %s is older than %s: generation works, weight sync would not (%s)", where, version,
                    floor, FIX.format(floor=floor))
    return ServerInfo(name, root, version)


async def check_servers(servers: Sequence[tuple[str, str, Optional[str]]], *, needs: Sequence[str] = (),
                        floor: str = VLLM_FLOOR, timeout_s: float = 10.0) -> list[ServerInfo]:
    """:func:`check_server` for each ``(name, url, api_key)`` at once; the first engine's failure is raised."""
    results = await asyncio.gather(*(check_server(n, u, api_key=k, needs=needs, floor=floor, timeout_s=timeout_s)
                                     for n, u, k in servers), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


async def _version(http: httpx.AsyncClient, where: str, required: bool, floor: str) -> Optional[str]:
    try:
        resp = await http.get("/version")
    except httpx.HTTPError as exc:
        if not required:  # generation only: the pool's own health checks take an unreachable engine out
            log.warning("%s: unreachable at start (%s: %s); the pool will mark it dead if it stays so", where,
                        type(exc).__name__, exc)
            return None
        raise EngineError(f"{where}: unreachable while checking its version ({type(exc).__name__}: {exc})") from None
    if resp.status_code in (401, 403):
        raise EngineError(f"{where}: /version answered {resp.status_code}: the API key is wrong or missing "
                          f"(engine.api_key)")
    if resp.status_code == 404:
        if required:
            raise EngineError(f"{where}: no /version: not a vLLM server (or a proxy hides it), and the pool needs "
                              f"vLLM's own API here; {FIX.format(floor=floor)}, or drop weight sync / dev mode")
        return None
    try:
        version = resp.json().get("version") if resp.status_code == 200 else None
    except ValueError:
        version = None
    if not isinstance(version, str):
        if required:
            raise EngineError(f"{where}: /version answered {resp.status_code} without a version "
                              f"({resp.text[:120]!r}); the pool needs vLLM >= {floor}")
        return None
    return version


def _refuse_old(where: str, version: Optional[str], floor: str, needs: Sequence[str]) -> None:
    have, want = parse_version(version or ""), parse_version(floor)
    if have is None or want is None:
        log.warning("%s: vLLM version %r unparsable; relying on the endpoint probe", where, version)
        return
    if have < want:
        uses = "; ".join(f"{p} for {ENDPOINTS[p].use}" for p in needs)
        raise EngineError(f"{where}: vLLM {version} is older than {floor}, the oldest with the API the pool calls "
                          f"({uses}); {FIX.format(floor=floor)}")


async def _probe(http: httpx.AsyncClient, where: str, path: str) -> bool:
    """Whether ``path`` exists, without calling it: a GET route is read, a POST route answers GET with 405."""
    try:
        resp = await http.get(path)
    except httpx.HTTPError as exc:
        raise EngineError(f"{where}: unreachable while probing {path} ({type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        raise EngineError(f"{where}: {path} answered {resp.status_code}: the API key is wrong or missing "
                          f"(engine.api_key)")
    return resp.status_code != 404


def _missing_line(where: str, version: Optional[str], floor: str, missing: list[str]) -> str:
    uses = "; ".join(f"{p} ({ENDPOINTS[p].use})" for p in missing)
    return (f"{where}: vLLM {version or '(unknown version)'} has no {uses}: start it with VLLM_SERVER_DEV_MODE=1 "
            f"(engine.dev_mode=true for engines the pool launches) and vLLM >= {floor}")
