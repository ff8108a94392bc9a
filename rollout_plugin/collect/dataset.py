"""Prompt datasets: JSONL in, validated examples out, every problem named by its line number.

A line is an object with one of ``prompt`` (text), ``messages`` (chat) or ``prompt_token_ids``; an
optional ``id`` (default: ``line-N``); any other fields (``answer`` …) go to the verifier.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rollout_plugin.errors import InputError
from rollout_plugin.types import Prompt

DEFAULT_DATASET = "arith.jsonl"


@dataclass(frozen=True)
class Example:
    id: str
    prompt: Prompt
    fields: dict[str, Any]


def default_dataset_path() -> Path:
    return Path(str(resources.files("rollout_plugin.data") / DEFAULT_DATASET))


def _prompt_of(row: dict[str, Any], where: str) -> Prompt:
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if k in row]
    if len(given) != 1:
        raise InputError(f"{where}: needs exactly one of 'prompt', 'messages', 'prompt_token_ids' (found {given or 'none'})")
    key = given[0]
    value = row[key]
    if key == "prompt" and isinstance(value, str) and value:
        return value
    if key == "messages" and isinstance(value, list) and value and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    if key == "prompt_token_ids" and isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise InputError(f"{where}: '{key}' must be a non-empty "
                     + {"prompt": "string", "messages": "list of {role, content}",
                        "prompt_token_ids": "list of ints"}[key])


def jsonl_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "file:line", parsed value)`` for each non-blank line; malformed JSON names its line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield lineno, where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def load_examples(path: str | None, limit: int | None = None) -> list[Example]:
    """Read and check the whole file before any engine starts, so bad input costs nothing."""
    file = Path(path).expanduser() if path else default_dataset_path()
    if not file.is_file():
        raise InputError(f"input={path!r}: no such file")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, where, row in jsonl_rows(file):
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt = _prompt_of(row, where)
        ex_id = str(row.get("id", f"line-{lineno}"))
        if ex_id in seen:
            raise InputError(f"{where}: duplicate id {ex_id!r} (first on line {seen[ex_id]})")
        seen[ex_id] = lineno
        fields = {k: v for k, v in row.items() if k not in ("prompt", "messages", "prompt_token_ids")}
        examples.append(Example(ex_id, prompt, fields))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InputError(f"input={str(file)!r}: no prompts in the file")
    return examples
