"""Completions the pool can model, as the pool's own requests: concurrent callers' prompts pack into one call.

A pass-through body travels alone (its placeholder request never packs). A non-streamed
``/v1/completions`` body that uses only what :class:`~rollout_plugin.types.SamplingParams` models
becomes one :class:`Request` per prompt instead, so the dispatcher packs compatible requests of
concurrent callers into one multi-prompt engine call (held up to ``pool.pack_timeout_s`` for a pack
to fill); each caller's :class:`Result` is turned back into vLLM's completion answer.

Only bodies whose answer this path gives exactly as the engine would go native; everything else
passes through (:func:`plan_completion` returns ``None``):

- ``max_tokens``, ``temperature`` and (unless ``temperature`` is 0) ``top_p`` must be set: the pool
  always sends them, and an engine fills missing ones from the model's generation config, which the
  gateway cannot see;
- ``logprobs`` only as ``logprobs=0`` (the sampled token's: the pool keeps no top-k; a greedy call's
  top token is not the sampled one either once the model's generation config adds a penalty) with
  tokens named by id (``return_tokens_as_token_ids``: the gateway has no tokenizer);
- ``stop_reason`` is not known here and is ``null``.
Pure functions: bodies and results in, requests and answers out.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rollout_plugin.types import Prompt, Request, Result, SamplingParams

__all__ = ["NativeCompletion", "completion_response", "plan_completion"]

KEYS = frozenset({"model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "min_tokens", "seed",
                  "stop", "ignore_eos", "logprobs", "return_token_ids", "return_tokens_as_token_ids", "stream"})


@dataclass(frozen=True)
class NativeCompletion:
    """One caller's completion body as pool requests: ``n`` samples of each prompt, one sampling."""

    prompts: tuple[Prompt, ...]
    n: int
    sampling: SamplingParams
    token_ids: bool  # return_token_ids: choices carry token_ids and prompt_token_ids
    logprobs: bool  # choices carry the sampled tokens' logprobs, tokens named "token_id:<id>"

    def requests(self) -> list[Request]:
        return [Request(f"gw-{uuid.uuid4().hex}", p, n=self.n, sampling=self.sampling) for p in self.prompts]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return _is_int(x) or isinstance(x, float)


def _prompts(prompt: Any) -> tuple[Prompt, ...] | None:
    """A string, a token-id list, or a non-empty list of either; ``None`` for any other shape."""
    def one(p: Any) -> bool:
        return isinstance(p, str) or (isinstance(p, list) and bool(p) and all(_is_int(t) for t in p))

    if one(prompt):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(one(p) for p in prompt):
        return tuple(prompt)
    return None


def _stop(stop: Any) -> tuple[str, ...] | None:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    return None


def _logprobs(body: dict[str, Any]) -> bool | None:
    """Whether choices carry logprobs; ``None`` when this path cannot answer the request exactly."""
    count = body.get("logprobs")
    if count is None:
        return False
    return True if _is_int(count) and count == 0 and body.get("return_tokens_as_token_ids") is True else None


def plan_completion(body: dict[str, Any], max_n: int) -> NativeCompletion | None:
    """The pool requests for a completion body, or ``None``: the body passes through as it is.

    ``max_n``: the most samples one pool request may ask (larger ``n`` passes through, clamped there)."""
    if body.keys() - KEYS or body.get("stream"):
        return None
    prompts = _prompts(body.get("prompt"))
    n, max_tokens = 1 if body.get("n") is None else body["n"], body.get("max_tokens")
    temperature = body.get("temperature")
    top_p = body.get("top_p", 1.0 if temperature == 0 else None)  # greedy: top_p changes nothing
    top_k, min_tokens, seed = body.get("top_k"), body.get("min_tokens"), body.get("seed")
    stop, ignore_eos = _stop(body.get("stop")), body.get("ignore_eos")
    if (prompts is None or stop is None or not _is_int(n) or not 1 <= n <= max_n or not _is_int(max_tokens)
            or max_tokens < 1 or not _is_number(temperature) or not _is_number(top_p)
            or not (top_k is None or _is_int(top_k)) or not (min_tokens is None or _is_int(min_tokens))
            or not (seed is None or _is_int(seed)) or not (ignore_eos is None or isinstance(ignore_eos, bool))
            or not isinstance(body.get("return_token_ids", False), bool)):
        return None
    logprobs = _logprobs(body)
    if logprobs is None:
        return None
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
        # The pool leaves top_k=-1 out of its call (the engine's default); an explicit -1 must stay explicit,
        # and 0 means the same to vLLM (no top-k) while being sent.
        top_k=-1 if top_k is None else (0 if top_k == -1 else top_k), min_tokens=min_tokens or 0, seed=seed,
        stop=stop, ignore_eos=bool(ignore_eos), logprobs=logprobs)
    return NativeCompletion(prompts, n, sampling, token_ids=body.get("return_token_ids") is True, logprobs=logprobs)


def _logprobs_object(token_ids: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
    """vLLM's completion logprobs with ``return_tokens_as_token_ids``: the sampled token only."""
    tokens = [f"token_id:{t}" for t in token_ids]
    values = [None if math.isnan(v) else v for v in logprobs]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens,
            "top_logprobs": [None if v is None else {t: v} for t, v in zip(tokens, values)]}


def completion_response(plan: NativeCompletion, results: Sequence[Result],
                        prompt_ids: Sequence[tuple[int, ...] | None], *, model: str, created: int) -> dict[str, Any]:
    """The OpenAI completion answer for ``results`` (one per prompt, all ok, in prompt order): choice
    ``index`` = prompt × n + sample, as vLLM numbers them. ``prompt_ids``: each text prompt's token ids as the
    engine tokenized it (token prompts are their own)."""
    choices = []
    prompt_tokens = completion_tokens = 0
    for i, (prompt, result) in enumerate(zip(plan.prompts, results)):
        ids = list(prompt) if not isinstance(prompt, str) else list(prompt_ids[i]) if prompt_ids[i] else None
        prompt_tokens += result.prompt_tokens
        for j, s in enumerate(result.samples):
            completion_tokens += s.output_tokens
            lp = (_logprobs_object(s.token_ids or (), s.logprobs or ())
                  if plan.logprobs and s.logprobs is not None else None)
            choices.append({"index": i * plan.n + j, "text": s.text, "logprobs": lp, "finish_reason": s.finish_reason,
                            "stop_reason": None, "token_ids": list(s.token_ids or ()) if plan.token_ids else None,
                            "prompt_logprobs": None, "prompt_token_ids": ids if plan.token_ids else None})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
             "completion_tokens": completion_tokens, "prompt_tokens_details": None}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}
