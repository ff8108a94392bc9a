"""Requests and results: the data that crosses the pool's boundary.

A :class:`Request` is one prompt and the number of samples wanted for it (a GRPO group when
``n > 1``). Every request id yields exactly one :class:`Result`: its ``n`` samples, or an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Message = dict[str, Any]
Prompt = Union[str, list[int], list[Message]]
PromptKind = Literal["text", "tokens", "chat"]


@dataclass(frozen=True)
class SamplingParams:
    """What the engine samples with; requests with equal params can share one HTTP call."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples so the params stay hashable (they key packing).
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class Request:
    """One prompt, ``n`` samples. ``id`` must be unique among requests in flight."""

    id: str
    prompt: Prompt
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Requests sharing an affinity key (the samples of a GRPO group sent one by one, the turns of a
    # multi-turn session) prefer the engine the key's last one went to: its prefix is cached there.
    # Several keys: the first one with a home decides (e.g. a session's id, then its group's prompt).
    affinity: str | tuple[str, ...] | None = field(default=None, compare=False, hash=False)

    @property
    def kind(self) -> PromptKind:
        if isinstance(self.prompt, str):
            return "text"
        if self.prompt and all(isinstance(t, int) for t in self.prompt):
            return "tokens"
        return "chat"


@dataclass(frozen=True)
class Segment:
    """Output tokens ``[start, end)`` of a sample were produced under weight version ``version``.

    A boundary is ``None`` where it is not known (a sample frozen across a ``keep`` weight update on a call
    that did not stream: both versions produced it, at an unknown split)."""

    version: int
    start: int | None
    end: int | None


@dataclass(frozen=True)
class Sample:
    """One completion of a request. ``segments``: which weights produced which tokens (one segment unless
    the sample spanned a weight update or continued on another engine)."""

    text: str
    token_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None
    finish_reason: str | None = None
    segments: tuple[Segment, ...] = ()

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else 0

    @property
    def versions(self) -> tuple[int, ...]:
        """The weight versions that produced this sample, oldest first."""
        return tuple(sorted({s.version for s in self.segments}))


def oldest_version(samples: Iterable[Sample], default: int) -> int:
    """The oldest weight version any of ``samples``' tokens came from (the staleness bound); ``default`` when no
    sample says (no segments: every token then came from the version the engine held)."""
    return min((seg.version for s in samples for seg in s.segments), default=default)


@dataclass(frozen=True)
class Result:
    """Exactly one per request id: ``samples`` on success, ``error`` otherwise (never both). An error record
    may keep ``partial``: its samples as far as they got before the failure (unfinished: never for training)."""

    id: str
    samples: tuple[Sample, ...] = ()
    prompt_tokens: int = 0
    engine: str | None = None
    latency_s: float = 0.0
    attempts: int = 1
    # The weights the engine held when it produced these samples; the oldest, when a sample spans
    # several (each sample's segments say which tokens came from which version).
    weight_version: int = 0
    error: str | None = None
    request: Request | None = field(default=None, compare=False, repr=False)
    partial: tuple[Sample, ...] = ()  # an error record's tokens so far (e.g. after its retries ran out)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.samples)
