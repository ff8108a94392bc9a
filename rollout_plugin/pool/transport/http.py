"""The one engine-client interface, and its HTTP implementation for OpenAI-compatible servers.

Transport only: a client sends the call it is given and returns samples or raises
:class:`CallError`; it never decides where work goes (that is :mod:`rollout_plugin.pool.dispatch.dispatcher`).

No HTTP request per sample: a call carries one or more requests that share sampling params and
``n``; text and token-id prompts go as one multi-prompt ``/v1/completions`` call with ``n=k``,
chat prompts as ``/v1/chat/completions`` with ``n=k`` (one group per call).

The transport is aiohttp, on one session per engine for data and control calls alike: its client
CPU per call stays flat as the pool keeps hundreds of calls in flight, where httpx's connection pool
scans every connection on every request event (0.6 ms per call at 8 in flight, 10.6 ms at 512;
``benchmarks/transport.py``). The connector has no connection limit: the pool's ledger is the only
limit, so no call waits in the client for a connection. This module is the only one that knows
aiohttp: every failure leaves it as a :class:`CallError` verdict.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from rollout_plugin.pool.core.engine_client import (
    CallError,
    EngineClient,
    Generation,
    Malformed,
    Partial,
    Progress,
    Rejected,
    TimedOut,
    Unavailable,
    verdict_for_status,
)
from rollout_plugin.pool.transport.keepalive import KEEPALIVE_S, REUSE_TRACE, Exchange, Raced
from rollout_plugin.pool.transport.sse import StreamedAnswer, aiter_events, logprob_values
from rollout_plugin.types import Request, Sample, SamplingParams

__all__ = ["JSON_HEADERS", "CallError", "EngineClient", "Generation", "HttpEngineClient", "Reply", "json_body",
           "raise_for_status", "sampling_body", "split_base_url"]

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}


def split_base_url(url: str) -> tuple[str, str]:
    """``http://h:p[/v1][/]`` -> (root ``http://h:p``, API base ``http://h:p/v1``)."""
    root = url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root, root + "/v1"


def sampling_body(sp: SamplingParams, n: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "n": n,
        "max_tokens": sp.max_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "return_token_ids": True,
    }
    # vLLM extensions and optional fields only when they differ from the server's defaults, so
    # hosted OpenAI-compatible APIs that reject unknown keys still accept plain calls.
    if sp.top_k != -1:
        body["top_k"] = sp.top_k
    if sp.min_tokens:
        body["min_tokens"] = sp.min_tokens
    if sp.ignore_eos:
        body["ignore_eos"] = True
    if sp.seed is not None:
        body["seed"] = sp.seed
    if sp.stop:
        body["stop"] = list(sp.stop)
    return body


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer, read off the wire: what control calls and the gateway's relay look at."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _phases(connect_s: float, read_s: float) -> aiohttp.ClientTimeout:
    """Per-phase limits as httpx had them: connecting, then each read (not the whole call: a streamed or
    long packed call may take as long as it keeps sending)."""
    return aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s, sock_read=read_s)


def _env_proxy(url: str) -> dict[str, Any]:
    """HTTP(S)_PROXY / NO_PROXY as httpx honoured them, resolved once per client (aiohttp's ``trust_env``
    would read the environment on every call)."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return {}
    return {"proxy": proxy, "proxy_auth": auth}


def json_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class HttpEngineClient:
    """An OpenAI-compatible server (vLLM, launched or attached) reached over one aiohttp session.

    Timeouts: ``connect_s`` to open a connection, ``request_s`` for each read of an answer (httpx's read
    timeout; there is no separate write timeout), ``health_s`` for /health, /metrics and control calls
    without their own. ``max_connections`` and ``admission_s`` are accepted for compatibility and unused:
    the connector has no limit, so a call never waits for a connection (the pool's ledger decides what
    is in flight) and there is no admission wait to time out.

    The session is opened on first use (aiohttp sessions belong to a running loop) and closed by
    :meth:`aclose`; a closed client answers every call with :class:`Unavailable`.
    """

    # The pool hands each call a progress sink; streamed calls fill it (what a cut sample continues from).
    reports_progress = True
    # The pool says which weight version each call runs under; the call's cache_salt keeps KV apart by version.
    salts_prefix_cache = True
    # The pool names each call (``X-Request-Id``) and may end it engine-side, answered with its tokens so far
    # (vLLM's ``/abort_requests``); a server without that endpoint turns this off at its first 404.
    aborts_calls = True

    def __init__(self, name: str, url: str, *, api_key: str | None, model: str, max_connections: int,
                 connect_s: float, request_s: float, admission_s: float, health_s: float,
                 stream: bool = False, extra_body: dict[str, Any] | None = None,
                 stream_min_tokens: int | None = None):
        del max_connections, admission_s  # see the class docstring: the ledger is the limit
        self.name = name
        self.root, self.api_base = split_base_url(url)
        self.model = model
        self.stream = stream
        # Calls this long stream even without ``stream``: an engine dying mid-call then costs only what
        # was in transit, not the whole sample (pool.stream_min_tokens).
        self.stream_min_tokens = stream_min_tokens
        self.extra_body = dict(extra_body or {})
        self._health_timeout = health_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = _phases(connect_s, request_s)
        self._health = _phases(health_s, health_s)
        self._proxy = _env_proxy(self.root)
        self._http: aiohttp.ClientSession | None = None
        self._closed = False
        # Per client: an attached engine outlives this pool, and another run's version 3 is other weights.
        self._salt = f"rp{secrets.token_hex(8)}"

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            if self._closed:
                raise Unavailable(f"{self.name}: client closed")
            # limit=0: no per-host queue in the client; keep-alive reuse on; no cookies (engines set none; a
            # hosted API's load-balancer cookie would only pin every call to one backend).
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
            self._http = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._timeout,
                                               cookie_jar=aiohttp.DummyCookieJar(), trace_configs=[REUSE_TRACE])
        return self._http

    async def aclose(self) -> None:
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def _send(self, method: str, url: str, body: dict[str, Any] | None = None, *,
                    timeout: aiohttp.ClientTimeout | None = None, again: bool = True,
                    headers: dict[str, str] | None = None) -> Reply:
        """One whole exchange; transport failures become :class:`TimedOut` / :class:`Unavailable`. ``again``:
        a dropped connection is tried once more (control calls). Without it (a generate call, whose failure is the
        dispatcher's to retry elsewhere) only a kept-alive connection dropped before any answer is: the keep-alive
        race, in which the server closed it as we reused it and the request never ran there — not an engine
        failure (counted as one, it once sent both engines of a loaded pair to ``suspect``)."""
        exchange = Exchange()
        kwargs: dict[str, Any] = {**self._proxy, "trace_request_ctx": exchange}
        if body is not None:
            kwargs["data"], kwargs["headers"] = json_body(body), {**JSON_HEADERS, **(headers or {})}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            try:
                async with self._session().request(method, url, **kwargs) as resp:
                    exchange.answered = True
                    return Reply(resp.status, await resp.read(), resp.headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                raced = exchange.reused and not exchange.answered
                if isinstance(exc, aiohttp.ClientConnectorError) or not (again or raced):  # refused: nothing reused
                    raise
                kwargs["trace_request_ctx"] = Exchange()
                # A kept-alive connection the server closed as we reused it (its idle timeout raced ours): the
                # request never ran there. Once more, on a fresh connection; a second failure is the verdict.
                log.debug("%s: %s %s: %s on a reused connection; once more", self.name, method, url, exc)
                async with self._session().request(method, url, **kwargs) as resp:
                    return Reply(resp.status, await resp.read(), resp.headers)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise TimedOut(f"{self.name}: {method} {url}: {type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"{self.name}: {method} {url}: {type(exc).__name__}: {exc}") from exc

    async def healthy(self) -> bool:
        for path in (f"{self.root}/health", f"{self.api_base}/models"):
            try:
                reply = await self._send("GET", path, timeout=self._health)
            except CallError:
                return False
            if reply.status == 200:
                return True
            if reply.status != 404:  # hosted APIs have no /health: fall back to /v1/models
                return False
        return False

    async def metrics(self) -> str | None:
        try:
            reply = await self._send("GET", f"{self.root}/metrics", timeout=self._health)
        except CallError:
            return None
        return reply.text if reply.status == 200 else None

    async def call_root(self, path: str, body: dict[str, Any] | None = None, *, method: str = "POST",
                        timeout_s: float | None = None) -> Reply:
        """A server-root control call; the answer whatever its status. Raises only for transport failures
        (:class:`TimedOut` / :class:`Unavailable`). ``timeout_s``: to connect and for each read (default: the
        client's connect and request timeouts). A GET carries no body."""
        timeout = _phases(timeout_s, timeout_s) if timeout_s is not None else None
        payload = (body or {}) if method != "GET" else None
        return await self._send(method, self.root + path, payload, timeout=timeout)

    async def admin(self, path: str, body: dict[str, Any] | None = None, *, timeout_s: float | None = None,
                    method: str = "POST") -> Any:
        """A server-root control endpoint (vLLM dev mode: ``/collective_rpc``, ``/reset_prefix_cache``).

        Returns the JSON answer (None when empty); raises :class:`CallError` on any failure.
        """
        reply = await self.call_root(path, body, method=method, timeout_s=timeout_s)
        if reply.status == 404:
            raise Rejected(f"{self.name}: {method} {path}: 404; the server lacks this endpoint "
                           f"(vLLM needs engine.dev_mode=true, i.e. VLLM_SERVER_DEV_MODE=1)", status=404)
        raise_for_status(self.name, reply.status, reply.text, reply.headers)
        try:
            return json.loads(reply.body) if reply.body else None
        except ValueError as exc:
            raise Malformed(f"{self.name}: {method} {path}: answer is not JSON") from exc

    async def abort_call(self, call_id: str, requests: int) -> None:
        """End call ``call_id`` engine-side: vLLM answers it with each sample's tokens so far, finish reason
        ``abort`` (``vllm/v1/engine/output_processor.py`` ``abort_requests``). Its requests' ids as vLLM's
        completions API names them (``cmpl-{id}-{i}``, one per prompt; ``chatcmpl-{id}`` for a chat); ids
        already finished are ignored. A 404 (no dev mode) turns this client's aborts off."""
        ids = [f"chatcmpl-{call_id}", *(f"cmpl-{call_id}-{i}" for i in range(requests))]
        try:
            await self.admin("/abort_requests", {"request_ids": ids}, timeout_s=self._health_timeout)
        except Rejected as exc:
            if exc.status == 404:
                self.aborts_calls = False
            raise

    def cache_salt(self, weight_version: int | None) -> str | None:
        """vLLM's per-request ``cache_salt`` for a call under ``weight_version``: prefix-cache blocks are shared only
        by calls with one salt, so after a weight update no call reuses KV computed under other weights, even
        where ``/reset_prefix_cache`` failed (it does while a ``keep`` update's frozen calls hold blocks). None
        (no salt) before the first update: the weights the engine started with, and hosted APIs that reject
        fields they do not know never see one. (vLLM: a non-empty string, at most 128 characters, none of
        ``@ / \\`` or NUL; ``vllm/entrypoints/generate/base/protocol.py`` ``validate_cache_salt``.)"""
        if not weight_version:
            return None
        return f"{self._salt}-v{weight_version}"

    async def generate(self, requests: Sequence[Request], progress: Progress | None = None, *,
                       weight_version: int | None = None, call_id: str | None = None) -> list[Generation]:
        first = requests[0]
        n, sp = first.n, first.sampling
        body = {"model": self.model, **sampling_body(sp, n)}
        salt = self.cache_salt(weight_version)
        if salt is not None:
            body["cache_salt"] = salt
        body.update(self.extra_body)  # the user's fields win, a cache_salt of theirs too
        if first.kind == "chat":
            if len(requests) != 1:
                raise ValueError("chat prompts go one group per call")
            path = "/chat/completions"
            body["messages"] = first.prompt
            if sp.logprobs:
                body["logprobs"] = True
        else:
            path = "/completions"
            body["prompt"] = [r.prompt for r in requests]
            if sp.logprobs:
                body["logprobs"] = 1
        long = self.stream_min_tokens is not None and sp.max_tokens >= self.stream_min_tokens
        # vLLM names the call's requests after it (vllm/entrypoints/serve/engine/serving.py _base_request_id)
        headers = {"X-Request-Id": call_id} if call_id else None
        if self.stream or long:
            choices, usage = await self._post_stream(path, body, progress, n, headers)
        else:
            for parts in progress or ():  # nothing will stream in: what it has so far is unknown, not none
                for p in parts:
                    p.blind = True
            data = await self._post(path, body, headers)
            choices, usage = data.get("choices") or [], data.get("usage") or {}
            if data.get("prompt_token_ids"):  # the chat API's, at the top level: the one prompt's
                for choice in choices:
                    choice.setdefault("prompt_token_ids", data["prompt_token_ids"])
        return _group_choices(choices, usage, len(requests), n, chat=first.kind == "chat")

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        reply = await self._send("POST", self.api_base + path, body, again=False, headers=headers)
        raise_for_status(self.name, reply.status, reply.text, reply.headers)
        try:
            data = json.loads(reply.body)
        except ValueError as exc:  # not JSON, or not even text (UnicodeDecodeError)
            raise Malformed(f"{self.name}: response is not JSON") from exc
        if not isinstance(data, dict):
            raise Malformed(f"{self.name}: response is JSON but not an object")
        return data

    async def _post_stream(self, path: str, body: dict[str, Any], progress: Progress | None = None, n: int = 1,
                           headers: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        answer = StreamedAnswer()
        try:
            try:
                await self._stream_into(answer, path, body, progress, n, headers)
            except Raced as raced:
                log.debug("%s: %s on a reused connection before any answer; once more", self.name, raced.__cause__)
                await self._stream_into(answer, path, body, progress, n, headers)
        except Raced as raced:  # twice: the verdict
            exc = raced.__cause__
            raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise TimedOut(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:  # not JSON, not UTF-8, shape
            raise Malformed(f"{self.name}: malformed event in stream") from exc
        # An error event, or a sample without a finish reason: a verdict, never samples cut short. Progress keeps
        # the tokens that streamed, so the dispatcher continues the samples from them.
        failure = answer.verdict(self.name)
        if failure is not None:
            raise failure
        return answer.merged(), answer.usage


    async def _stream_into(self, answer: StreamedAnswer, path: str, body: dict[str, Any], progress: Progress | None,
                           n: int, headers: dict[str, str] | None) -> None:
        """One streamed exchange into ``answer``; a drop before any answer on a kept-alive connection is marked
        :class:`Raced` (see :meth:`HttpEngineClient._send`)."""
        exchange = Exchange()
        try:
            async with self._session().post(self.api_base + path, data=json_body(body),
                                            headers={**JSON_HEADERS, **(headers or {})}, trace_request_ctx=exchange,
                                            **self._proxy) as resp:
                exchange.answered = True
                if resp.status != 200:
                    text = (await resp.read()).decode("utf-8", "replace")
                    raise_for_status(self.name, resp.status, text, resp.headers)
                # Raw chunks, not lines: sampled text holds separators a line splitter breaks on
                # (pool/transport/sse.py). Read to the end, past [DONE], so the connection goes back for reuse.
                async for data in aiter_events(resp.content.iter_any()):
                    for acc in answer.add(data):
                        if progress is not None:
                            _report(progress[acc["index"] // n][acc["index"] % n], acc)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if exchange.reused and not exchange.answered and not isinstance(exc, aiohttp.ClientConnectorError):
                raise Raced() from exc
            raise


def _report(p: Partial, acc: dict[str, Any]) -> None:
    """Mirror a streamed choice into the pool's progress sink (the lists are shared, not copied)."""
    p.token_ids = acc.setdefault("token_ids", p.token_ids)
    p.text = acc.get("text", "")
    p.finish_reason = acc.get("finish_reason")
    if "prompt_token_ids" in acc:
        p.prompt_token_ids = acc["prompt_token_ids"]
    if "_logprobs" in acc:
        p.logprobs = acc["_logprobs"]


def raise_for_status(name: str, status: int, text: str, headers: Mapping[str, str]) -> None:
    if status == 200:
        return
    if status == 429:
        raise verdict_for_status(status, f"{name}: rate limited (429)", _seconds(headers.get("retry-after")))
    raise verdict_for_status(status, f"{name}: HTTP {status}: {' '.join(text.split())[:300]}")


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing; the backoff takes over
        return None


def _sample_of(choice: dict[str, Any], chat: bool) -> Sample:
    text = (choice.get("message") or {}).get("content") if chat and "message" in choice else choice.get("text")
    token_ids = choice.get("token_ids")
    if "_logprobs" in choice:
        logprobs: list[float] | None = choice["_logprobs"]
    else:
        logprobs = logprob_values(choice["logprobs"]) if choice.get("logprobs") else None
    return Sample(
        text=text or "",
        token_ids=tuple(token_ids) if token_ids is not None else None,
        logprobs=tuple(logprobs) if logprobs is not None else None,
        finish_reason=choice.get("finish_reason"),
    )


def _group_choices(choices: list[dict[str, Any]], usage: dict[str, Any], n_requests: int, n: int,
                   chat: bool) -> list[Generation]:
    """Choices of a multi-prompt call come back indexed ``prompt_index × n + sample_index``."""
    if len(choices) != n_requests * n:
        raise Malformed(f"expected {n_requests * n} choices, got {len(choices)}")
    samples: list[list[Sample]] = [[] for _ in range(n_requests)]
    prompt_tokens = [0] * n_requests
    prompt_ids: list[tuple[int, ...] | None] = [None] * n_requests
    for choice in sorted(choices, key=lambda c: c.get("index", 0)):
        i = int(choice.get("index", 0)) // n
        samples[i].append(_sample_of(choice, chat))
        if choice.get("prompt_token_ids") is not None:
            prompt_tokens[i] = len(choice["prompt_token_ids"])
            prompt_ids[i] = tuple(choice["prompt_token_ids"])  # what a sample cut short continues from
    if n_requests == 1 and not prompt_tokens[0]:
        prompt_tokens[0] = int(usage.get("prompt_tokens") or 0)
    return [Generation(tuple(s), p, ids) for s, p, ids in zip(samples, prompt_tokens, prompt_ids)]
