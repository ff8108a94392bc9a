"""The one engine-client interface, and its HTTP implementation for OpenAI-compatible servers.

Transport only: a client sends the call it is given and returns samples or raises
:class:`CallError`; it never decides where work goes (that is :mod:`rollout_plugin.pool.dispatch`).

No HTTP request per sample: a call carries one or more requests that share sampling params and
``n``; text and token-id prompts go as one multi-prompt ``/v1/completions`` call with ``n=k``,
chat prompts as ``/v1/chat/completions`` with ``n=k`` (one group per call).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from rollout_plugin.pool.sse import aiter_events
from rollout_plugin.types import Request, Sample, SamplingParams

log = logging.getLogger(__name__)


class CallError(Exception):
    """One call failed. ``retryable``: another try may work; ``suspect``: the engine may be down."""

    def __init__(self, message: str, *, retryable: bool, suspect: bool = False, status: int | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.suspect = suspect
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Generation:
    """What an engine returned for one request of a call."""

    samples: tuple[Sample, ...]
    prompt_tokens: int

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.samples)


class EngineClient(Protocol):
    """All engine I/O goes through this; tests of policy may implement it in memory."""

    name: str

    async def generate(self, requests: Sequence[Request]) -> list[Generation]: ...

    async def healthy(self) -> bool: ...

    async def metrics(self) -> str | None:
        """The engine's Prometheus text, or None when it has none (hosted APIs) or did not answer."""
        ...

    async def aclose(self) -> None: ...


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


class HttpEngineClient:
    """An OpenAI-compatible server (vLLM, launched or attached) reached with one pooled httpx client."""

    def __init__(self, name: str, url: str, *, api_key: str | None, model: str, max_connections: int,
                 connect_s: float, request_s: float, admission_s: float, health_s: float,
                 stream: bool = False, extra_body: dict[str, Any] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.name = name
        self.root, self.api_base = split_base_url(url)
        self.model = model
        self.stream = stream
        self.extra_body = dict(extra_body or {})
        self._health_timeout = health_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Connection limit = the engine's in-flight cap: the client never queues work the pool admitted.
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(connect=connect_s, read=request_s, write=request_s, pool=admission_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        for path in (f"{self.root}/health", f"{self.api_base}/models"):
            try:
                resp = await self._http.get(path, timeout=self._health_timeout)
            except httpx.HTTPError:
                return False
            if resp.status_code == 200:
                return True
            if resp.status_code != 404:  # hosted APIs have no /health: fall back to /v1/models
                return False
        return False

    async def metrics(self) -> str | None:
        try:
            resp = await self._http.get(f"{self.root}/metrics", timeout=self._health_timeout)
        except httpx.HTTPError:
            return None
        return resp.text if resp.status_code == 200 else None

    async def admin(self, path: str, body: dict[str, Any] | None = None, *,
                    timeout_s: float | None = None) -> Any:
        """POST to a server-root control endpoint (vLLM dev mode: ``/collective_rpc``, ``/reset_prefix_cache``).

        Returns the JSON answer (None when empty); raises :class:`CallError` on any failure.
        """
        try:
            resp = await self._http.post(self.root + path, json=body or {},
                                         timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise CallError(f"{self.name}: POST {path}: {type(exc).__name__}: {exc}", retryable=False,
                            suspect=True) from exc
        if resp.status_code == 404:
            raise CallError(f"{self.name}: POST {path}: 404; the server lacks this endpoint "
                            f"(vLLM needs engine.dev_mode=true, i.e. VLLM_SERVER_DEV_MODE=1)", retryable=False,
                            status=404)
        _raise_for_status(self.name, resp.status_code, resp.text, resp.headers)
        return resp.json() if resp.content else None

    async def generate(self, requests: Sequence[Request]) -> list[Generation]:
        first = requests[0]
        n, sp = first.n, first.sampling
        body = {"model": self.model, **sampling_body(sp, n), **self.extra_body}
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
        if self.stream:
            choices, usage = await self._post_stream(path, body)
        else:
            data = await self._post(path, body)
            choices, usage = data.get("choices", []), data.get("usage") or {}
        return _group_choices(choices, usage, len(requests), n, chat=first.kind == "chat")

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._http.post(self.api_base + path, json=body)
        except httpx.PoolTimeout as exc:
            raise CallError(f"{self.name}: no free connection within the admission timeout", retryable=True) from exc
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise CallError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True, suspect=True) from exc
        _raise_for_status(self.name, resp.status_code, resp.text, resp.headers)
        try:
            return resp.json()
        except ValueError as exc:  # not JSON, or not even text (UnicodeDecodeError)
            raise CallError(f"{self.name}: response is not JSON", retryable=True, suspect=True) from exc

    async def _post_stream(self, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        merged: dict[int, dict[str, Any]] = {}
        usage: dict[str, Any] = {}
        try:
            async with self._http.stream("POST", self.api_base + path, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    _raise_for_status(self.name, resp.status_code, text, resp.headers)
                async for data in aiter_events(resp.aiter_bytes()):
                    if data.strip() == "[DONE]":
                        break
                    event = json.loads(data)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        _merge_delta(merged.setdefault(choice["index"], {"index": choice["index"]}), choice)
        except httpx.PoolTimeout as exc:
            raise CallError(f"{self.name}: no free connection within the admission timeout", retryable=True) from exc
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise CallError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True, suspect=True) from exc
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CallError(f"{self.name}: malformed event in stream", retryable=True, suspect=True) from exc
        return [merged[i] for i in sorted(merged)], usage


def _raise_for_status(name: str, status: int, text: str, headers: httpx.Headers) -> None:
    if status == 200:
        return
    detail = " ".join(text.split())[:300]
    if status == 429:
        retry_after = headers.get("retry-after")
        raise CallError(f"{name}: rate limited (429)", retryable=True, status=status,
                        retry_after_s=_seconds(retry_after))
    if status >= 500:
        raise CallError(f"{name}: HTTP {status}: {detail}", retryable=True, suspect=True, status=status)
    raise CallError(f"{name}: HTTP {status}: {detail}", retryable=False, status=status)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing; the backoff takes over
        return None


def _merge_delta(acc: dict[str, Any], choice: dict[str, Any]) -> None:
    delta = choice.get("delta")
    text = (delta or {}).get("content") if delta is not None else choice.get("text")
    acc["text"] = acc.get("text", "") + (text or "")
    if choice.get("token_ids"):
        acc.setdefault("token_ids", []).extend(choice["token_ids"])
    if choice.get("prompt_token_ids"):  # sent once, in a choice's first chunk
        acc["prompt_token_ids"] = choice["prompt_token_ids"]
    if choice.get("finish_reason"):
        acc["finish_reason"] = choice["finish_reason"]
    lp = choice.get("logprobs")
    if lp:
        acc.setdefault("_logprobs", []).extend(_logprob_values(lp))


def _logprob_values(lp: dict[str, Any]) -> list[float]:
    if "content" in lp:  # chat: [{"token", "logprob", ...}]
        return [float(item["logprob"]) for item in lp.get("content") or []]
    return [float(x) if x is not None else 0.0 for x in lp.get("token_logprobs") or []]


def _sample_of(choice: dict[str, Any], chat: bool) -> Sample:
    text = (choice.get("message") or {}).get("content") if chat and "message" in choice else choice.get("text")
    token_ids = choice.get("token_ids")
    if "_logprobs" in choice:
        logprobs: list[float] | None = choice["_logprobs"]
    else:
        logprobs = _logprob_values(choice["logprobs"]) if choice.get("logprobs") else None
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
        raise CallError(f"expected {n_requests * n} choices, got {len(choices)}", retryable=True)
    samples: list[list[Sample]] = [[] for _ in range(n_requests)]
    prompt_tokens = [0] * n_requests
    for choice in sorted(choices, key=lambda c: c.get("index", 0)):
        i = int(choice.get("index", 0)) // n
        samples[i].append(_sample_of(choice, chat))
        if choice.get("prompt_token_ids") is not None:
            prompt_tokens[i] = len(choice["prompt_token_ids"])
    if n_requests == 1 and not prompt_tokens[0]:
        prompt_tokens[0] = int(usage.get("prompt_tokens") or 0)
    return [Generation(tuple(s), p) for s, p in zip(samples, prompt_tokens)]
