"""The one SSE parser: an engine's event stream, from raw bytes to typed events to one merged answer and its verdict.

The pool's client (:mod:`rollout_plugin.pool.transport.http`) and the gateway's relay (:mod:`rollout_plugin.gateway.relay`)
both read streams through :class:`StreamedAnswer`, so the two cannot drift apart.

Bytes are split on blank lines only: httpx's ``aiter_lines`` also splits on \\x1c–\\x1e, \\x85 and \\u2028,
which sampled text contains; splitting those corrupts events. SSE lines end with \\n, \\r or \\r\\n; nothing else.

What vLLM 0.32 sends (``vllm/entrypoints/openai/completion/serving.py``, ``chat_completion/serving.py``):

- chunks of choices, each choice's deltas under its ``index``; the last chunk carries ``usage``; then ``[DONE]``;
- a failure once the stream started (the engine core died, a request rejected when the engine added it, a
  finish reason ``error``) is sent *inside* the stream under HTTP 200: ``{"error": {"message", "type", "param",
  "code"}}`` (``ErrorResponse``, ``vllm/entrypoints/serve/engine/protocol.py``; ``code`` is the HTTP status vLLM
  would have answered), then ``[DONE]``. Older servers send it flat: ``{"object": "error", "message", "code"}``;
- chat chunks carry ``prompt_token_ids`` at the top level (``ChatCompletionStreamResponse``), completion chunks
  per choice (``CompletionResponseStreamChoice``), both once, in a choice's first chunk.

A stream is whole only if every choice ended with a finish reason and no error event came: anything else is a
verdict (:meth:`StreamedAnswer.verdict`), never an answer with samples cut short.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

from rollout_plugin.pool.core.engine_client import CallError, Unavailable, verdict_for_status

__all__ = ["DONE", "Chunk", "Done", "Event", "SSEDecoder", "StreamError", "StreamedAnswer", "aiter_events",
           "iter_events", "logprob_values", "merge_choice", "parse_event"]

DONE = "[DONE]"
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


def _data_of(block: bytes) -> str | None:
    parts = []
    for line in _LINE.split(block):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts).decode("utf-8") if parts else None


class SSEDecoder:
    """Incremental decoder: feed byte chunks, get the ``data`` payload of each complete event."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buffer += chunk
        while True:
            match = _EVENT_END.search(self._buffer)
            if match is None:
                return
            block, self._buffer = self._buffer[: match.start()], self._buffer[match.end():]
            data = _data_of(block)
            if data is not None:
                yield data

    def flush(self) -> Iterator[str]:
        block, self._buffer = self._buffer, b""
        data = _data_of(block) if block.strip() else None
        if data is not None:
            yield data


def iter_events(chunks: Iterable[bytes]) -> Iterator[str]:
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for data in decoder.feed(chunk):
            yield data
    for data in decoder.flush():
        yield data


# -- typed events ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Done:
    """``data: [DONE]``: the server ended the stream."""


@dataclass(frozen=True, slots=True)
class StreamError:
    """An error event: the call failed after its stream began. ``status``: the HTTP status it stands for."""

    status: int | None
    message: str
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """Deltas of some choices; ``prompt_token_ids``: the chat API's, at the top level."""

    choices: tuple[dict[str, Any], ...]
    usage: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None


Event = Union[Done, StreamError, Chunk]


def parse_event(data: str) -> Event:
    """One event's ``data``. Raises ValueError (not JSON, not an object) or TypeError (choices not a list)."""
    if data.strip() == DONE:
        return Done()
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError("an event that is not a JSON object")
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise TypeError("choices is not a list")
    if not choices:
        error = _error_of(event)
        if error is not None:
            return error
    top = event.get("prompt_token_ids")
    return Chunk(tuple(choices), event.get("usage") or None, list(top) if top else None)


def _error_of(event: dict[str, Any]) -> StreamError | None:
    """An event without choices that carries an error, in either shape (see the module docstring)."""
    err = event.get("error")
    if err is not None:
        if isinstance(err, dict):
            return StreamError(_status(err.get("code")), str(err.get("message") or err), _kind(err.get("type")))
        return StreamError(None, str(err))
    if event.get("object") == "error":
        return StreamError(_status(event.get("code")), str(event.get("message") or event), _kind(event.get("type")))
    return None


def _status(code: Any) -> int | None:
    """vLLM's ``code`` is the HTTP status; OpenAI's may be a word (``rate_limit_exceeded``) or absent. None unless
    it is an error status."""
    try:
        status = int(code)
    except (TypeError, ValueError):
        return None
    return status if 400 <= status <= 599 else None


def _kind(value: Any) -> str | None:
    return str(value) if value is not None else None


# -- one answer, merged ----------------------------------------------------------------------------------------

def logprob_values(lp: dict[str, Any]) -> list[float]:
    if "content" in lp:  # chat: [{"token", "logprob", ...}]
        return [float(item["logprob"]) for item in lp.get("content") or []]
    # A token without a logprob stays visible (NaN): never a plausible 0.0 an IS correction would trust.
    return [float(x) if x is not None else math.nan for x in lp.get("token_logprobs") or []]


def merge_choice(acc: dict[str, Any], choice: dict[str, Any]) -> None:
    """Add one chunk's delta of a choice to what that choice has so far (text, token ids, finish reason, logprobs)."""
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
        acc.setdefault("_logprobs", []).extend(logprob_values(lp))


class StreamedAnswer:
    """What a stream said so far: each choice merged (``choices[index]``, a completion choice's keys plus
    ``_logprobs``), ``usage``, the first error event, and whether ``[DONE]`` came."""

    def __init__(self) -> None:
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] = {}
        self.prompt_token_ids: list[int] | None = None  # the chat API's, at the top level
        self.error: StreamError | None = None
        self.done = False

    def add(self, data: str) -> list[dict[str, Any]]:
        """Merge one event's ``data``; returns the choices it changed. Raises ValueError, KeyError or TypeError
        for an event of another shape."""
        event = parse_event(data)
        if isinstance(event, Done):
            self.done = True
            return []
        if isinstance(event, StreamError):
            self.error = self.error or event  # the first one is the cause
            return []
        self.usage = event.usage or self.usage
        if event.prompt_token_ids:
            self.prompt_token_ids = event.prompt_token_ids
        touched = []
        for choice in event.choices:
            index = int(choice["index"])
            acc = self.choices.setdefault(index, {"index": index})
            merge_choice(acc, choice)
            # A chat call has one prompt: its top-level ids are every choice's (what a cut sample continues from).
            if self.prompt_token_ids is not None and "prompt_token_ids" not in acc:
                acc["prompt_token_ids"] = self.prompt_token_ids
            touched.append(acc)
        return touched

    def merged(self) -> list[dict[str, Any]]:
        return [self.choices[i] for i in sorted(self.choices)]

    def unfinished(self) -> list[int]:
        """Indexes of the choices that streamed without a finish reason so far."""
        return [i for i in sorted(self.choices) if not self.choices[i].get("finish_reason")]

    def verdict(self, name: str) -> CallError | None:
        """Once the stream ended: None if it is whole, else why not — an error event's verdict by its status as
        for an HTTP answer (a bad request is :class:`Rejected`; an engine error, or no status, is
        :class:`Unavailable`: the samples continue from the tokens they streamed), or :class:`Unavailable` for
        samples that lack a finish reason (a stream cut without an error)."""
        if self.error is not None:
            err = self.error
            what = f"error event in the stream (status {err.status}, {err.kind or 'no type'}): {err.message}"
            return verdict_for_status(err.status, f"{name}: {' '.join(what.split())[:300]}")
        cut = self.unfinished()
        if cut:
            end = "ended" if self.done else "ended without [DONE]"
            return Unavailable(f"{name}: the stream {end} with {len(cut)} of {len(self.choices)} sample(s) "
                               f"lacking a finish reason (indexes {cut[:8]})")
        return None
