"""Timeline recorder: one JSONL record per observation and per state change.

Record kinds (``rollout-plugin plot`` draws them): ``meta`` (first line), ``sample`` (per engine per
poll), ``cap`` (old -> new with its reason), ``health`` (old -> new with its reason).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any


class TimelineRecorder:
    """Append-only; ``t`` is seconds since the recorder opened (the caller passes its clock's now)."""

    def __init__(self, path: str | Path, engines: list[str], t0: float, title: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = t0
        self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self._write({"kind": "meta", "started_at": time.time(), "engines": engines, "title": title})

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def sample(self, now: float, engine: str, **fields: Any) -> None:
        self._write({"kind": "sample", "t": round(now - self.t0, 3), "engine": engine, **fields})

    def change(self, kind: str, now: float, engine: str, old: Any, new: Any, reason: str) -> None:
        self._write({"kind": kind, "t": round(now - self.t0, 3), "engine": engine, "old": old, "new": new,
                     "reason": reason})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
