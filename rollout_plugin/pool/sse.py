"""Server-sent events parsed from bytes, split on blank lines only.

httpx's ``aiter_lines`` also splits on \\x1c–\\x1e, \\x85 and \\u2028, which sampled text contains;
splitting those corrupts events. SSE lines end with \\n, \\r or \\r\\n; nothing else.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

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
