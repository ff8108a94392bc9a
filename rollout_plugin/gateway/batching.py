"""Split a multi-prompt ``/v1/completions`` body into one body per prompt, and merge the answers back.

TRL's ``VLLMClient.generate`` sends a whole batch in one call; split, its prompts spread over every
engine of the pool instead of queueing on one. Pure functions: bodies in, bodies out.
"""

from __future__ import annotations

from typing import Any

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def prompt_count(prompt: Any) -> int:
    """Prompts in an OpenAI ``prompt`` field: a string, a token-id list, or a list of either."""
    if isinstance(prompt, list) and prompt and (isinstance(prompt[0], str) or isinstance(prompt[0], list)):
        return len(prompt)
    return 1


def split_prompts(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One body per prompt (the body itself when it holds one prompt)."""
    prompt = body.get("prompt")
    if prompt_count(prompt) == 1:
        return [body]
    return [{**body, "prompt": p} for p in prompt]  # type: ignore[union-attr]


def merge_completions(parts: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Answers of the split bodies, in prompt order, as one answer: choice ``index`` = prompt × n + sample
    (the order vLLM itself uses for a multi-prompt call)."""
    if len(parts) == 1:
        return parts[0]
    merged = {k: v for k, v in parts[0].items() if k not in ("choices", "usage")}
    choices = []
    usage = dict.fromkeys(USAGE_KEYS, 0)
    for i, part in enumerate(parts):
        for choice in sorted(part.get("choices") or [], key=lambda c: c.get("index", 0)):
            choices.append({**choice, "index": i * n + int(choice.get("index", 0))})
        for key in USAGE_KEYS:
            usage[key] += int((part.get("usage") or {}).get(key) or 0)
    merged["choices"] = choices
    merged["usage"] = usage
    return merged
