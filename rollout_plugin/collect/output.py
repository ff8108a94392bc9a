"""The rollout JSONL: refuse to clobber, resume without duplicates, never leave half a group.

Each prompt's k samples are written with one ``write`` and flushed, so a crash leaves at most one
torn line at the end; resume drops it (and any group that is short) and skips ids already written.
Failed requests go to ``<output>.errors.jsonl`` and are retried by a resumed run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import IO, Any

from rollout_plugin.errors import InputError


def sample_id(prompt_id: str, j: int) -> str:
    return f"{prompt_id}#{j}"


def summary_path(output: Path) -> Path:
    return output.with_name(output.stem + ".summary.json")


def timeline_path(output: Path) -> Path:
    return output.with_name(output.stem + ".timeline.jsonl")


def errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors.jsonl")


def _read_complete_groups(path: Path, k: int) -> tuple[set[str], list[str]]:
    """(prompt ids with all k samples, the lines to keep)."""
    lines: list[str] = []
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if not raw.endswith("\n"):
                break  # torn last line
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            lines.append(raw)
    counts = Counter(r["prompt_id"] for r in rows)
    ks = {r.get("k") for r in rows}
    if ks and ks != {k}:
        raise InputError(f"resume=true: {path} was written with k={sorted(ks)}, not pool.k={k}")
    done = {pid for pid, c in counts.items() if c == k}
    kept = [line for line, r in zip(lines, rows) if r["prompt_id"] in done]
    return done, kept


class RolloutWriter:
    """Opened after all input checks passed; appends groups; ``close`` on every path."""

    def __init__(self, output: str, *, k: int, overwrite: bool, resume: bool):
        self.path = Path(output).expanduser()
        self.k = k
        self.done: set[str] = set()
        if self.path.is_dir():
            raise InputError(f"output={output!r}: is a directory")
        if self.path.exists() and not (overwrite or resume):
            raise InputError(f"output={output!r} exists; pass overwrite=true to replace it or resume=true to continue")
        if not self.path.parent.is_dir():
            raise InputError(f"output={output!r}: directory {str(self.path.parent)!r} does not exist")
        self._resume = resume and self.path.exists()
        self._file: IO[str] | None = None
        self._errors: IO[str] | None = None
        if self._resume:
            self.done, kept = _read_complete_groups(self.path, k)
            self._kept = kept
        self.written_groups = 0
        self.error_groups = 0

    def open(self) -> None:
        if self._resume:
            # Rewrite without the torn tail, atomically, then append.
            tmp = self.path.with_name(self.path.name + ".partial")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(self._kept)
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")
        err = errors_path(self.path)
        self._errors = open(err, "w", encoding="utf-8")

    def write_group(self, rows: list[dict[str, Any]]) -> None:
        if self._file is None:
            raise RuntimeError("RolloutWriter.open() first")
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._file.flush()
        self.written_groups += 1

    def write_error(self, row: dict[str, Any]) -> None:
        if self._errors is None:
            raise RuntimeError("RolloutWriter.open() first")
        self._errors.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._errors.flush()
        self.error_groups += 1

    def close(self) -> None:
        for f in (self._file, self._errors):
            if f is not None:
                f.close()
        if self._errors is not None and self.error_groups == 0:
            errors_path(self.path).unlink(missing_ok=True)
        self._file = self._errors = None
