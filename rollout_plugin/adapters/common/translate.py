"""Trainer prompts -> pool requests, pool results -> the columns a trainer trains on.

Trainer-neutral: a tokenizer is anything Hugging Face-shaped (``apply_chat_template`` and ``__call__``; a
processor that wraps one is unwrapped). One renderer for every route, so a chat template option the
trainer sets (``chat_template_kwargs``, e.g. ``enable_thinking=False``) reaches every prompt the pool sees.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rollout_plugin.adapters.common.versions import Span, completion_spans, oldest_version
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.types import Request, Result, SamplingParams

__all__ = ["LOGPROBS_FIX", "checked", "group_key", "group_requests", "render_prompt", "render_prompts",
           "sample_logprobs", "unpack"]

_ids = itertools.count()

LOGPROBS_FIX = ("the pool asks for them (`logprobs` in every request); serve the trainer from vLLM engines started with "
                "`--logprobs-mode processed_logprobs` (engine.extra_args=[--logprobs-mode,processed_logprobs]), "
                "whose logprobs are the sampled tokens' after temperature, top-p and top-k")


def render_prompt(tokenizer: Any, prompt: Any, chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """``prompt``'s token ids: a conversation (a list of ``{"role", "content"}`` messages) through the chat
    template with the generation prompt and ``chat_template_kwargs``; text as is, no special tokens added."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
    if isinstance(prompt, list):
        return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            **dict(chat_template_kwargs or {}))["input_ids"])
    return list(tok(prompt, add_special_tokens=False)["input_ids"])


def render_prompts(tokenizer: Any, prompts: Sequence[Any],
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """:func:`render_prompt` for each of ``prompts``."""
    return [render_prompt(tokenizer, p, chat_template_kwargs) for p in prompts]


def group_requests(prompts: Sequence[Any], n: int, sampling: SamplingParams, tag: str) -> list[Request]:
    """One request per distinct prompt (token ids, text or messages), ``n`` samples each."""
    batch = next(_ids)
    return [Request(id=f"{tag}-{batch}-{i}", prompt=list(p) if not isinstance(p, str) else p, n=n,
                    sampling=sampling) for i, p in enumerate(prompts)]


def group_key(prompt_ids: Sequence[int]) -> str:
    """The affinity key of a GRPO group sent one sample at a time: its samples share the prompt's prefix cache."""
    return f"group:{hash(tuple(int(t) for t in prompt_ids))}"


def checked(results: Sequence[Result]) -> Sequence[Result]:
    """A training batch cannot have holes: a failed request (after the pool's retries) fails the step."""
    failed = [r for r in results if not r.ok]
    if failed:
        raise TrainerAdapterError(f"{len(failed)} of {len(results)} rollout requests failed; first: "
                                  f"{failed[0].id}: {failed[0].error}")
    for r in results:
        if any(s.token_ids is None for s in r.samples):
            raise TrainerAdapterError(f"{r.id}: the engine returned no token ids (needs vLLM's return_token_ids)")
    return results


def sample_logprobs(result: Result, j: int) -> list[float]:
    """Sample ``j``'s logprob per sampled token; a hole would feed an importance-sampling correction made-up
    numbers, so a missing one fails the step, naming the engine and the fix."""
    s = result.samples[j]
    n = len(s.token_ids or ())
    if s.logprobs is None or len(s.logprobs) != n or any(math.isnan(x) for x in s.logprobs):
        got = ("none" if s.logprobs is None else f"{len(s.logprobs)} for {n} tokens" if len(s.logprobs) != n
               else "a token without one")
        raise TrainerAdapterError(f"{result.engine or 'an engine'}: no logprob per sampled token for {result.id} "
                                  f"sample {j} (got {got}); {LOGPROBS_FIX}")
    return list(s.logprobs)


def unpack(results: Sequence[Result]) -> tuple[list[list[int]], list[list[float]], list[int], list[list[Span]]]:
    """Per completion, in group order: token ids, sampled-token logprobs (every one present), the oldest weight
    version of its tokens, and its spans ``(version, start, end)`` (:mod:`.versions`: more than one when the
    sample crossed a weight update)."""
    completion_ids, logprobs, versions, spans = [], [], [], []
    for r in results:
        for j, s in enumerate(r.samples):
            completion_ids.append(list(s.token_ids or ()))
            logprobs.append(sample_logprobs(r, j))
            versions.append(oldest_version([s], r.weight_version))
            spans.append(completion_spans(s, r.weight_version))
    return completion_ids, logprobs, versions, spans
