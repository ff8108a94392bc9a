"""The one engine-client interface and the verdicts a call can end in (transport-neutral).

Policy (:mod:`rollout_plugin.pool.dispatch`) sees only these: a client turns whatever its transport
says (HTTP status codes, connection errors, a reply that does not parse) into one of the
:class:`CallError` subclasses below, httpx-style: catch the family you can act on.

- :class:`Rejected`: the engine refused *this request* (bad prompt, too long): another try will not
  help; a packed call is resent member by member so only the bad one fails.
- :class:`RateLimited`: the engine (a hosted API) wants fewer calls; retry after ``retry_after_s``.
- :class:`Unavailable`: the engine may be down (refused, reset, 5xx); retry elsewhere, probe it.
- :class:`TimedOut`: no answer in time; like :class:`Unavailable`.
- :class:`Malformed`: an answer that does not match the call (not JSON, too few choices); retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rollout_plugin.types import Request, Sample

__all__ = ["CallError", "EngineClient", "Generation", "Malformed", "Partial", "Progress", "RateLimited", "Rejected",
           "TimedOut", "Unavailable", "check_reply", "new_progress", "verdict_for_status"]


class CallError(Exception):
    """One call failed. ``status``: what the server answered, when it answered (for callers that relay it)."""

    retryable = True  # another try (here or elsewhere) may work
    suspect = False  # the engine itself may be down: probe it

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Rejected(CallError):
    retryable = False


class RateLimited(CallError):
    pass


class Unavailable(CallError):
    suspect = True


class TimedOut(Unavailable):
    pass


class Malformed(CallError):
    suspect = True


def verdict_for_status(status: int | None, message: str, retry_after_s: float | None = None) -> CallError:
    """The verdict for an error status an engine answered: an HTTP status, or the ``code`` of an error event inside
    a stream (vLLM sends the status it would have answered). 429: rate limited; another status below 500: this
    request is refused (vLLM: a validation error, a prompt too long: 400); 5xx (an engine error, the engine core
    dead) or no status at all: the engine may be down."""
    if status == 429:
        return RateLimited(message, status=status, retry_after_s=retry_after_s)
    if status is not None and status < 500:
        return Rejected(message, status=status)
    return Unavailable(message, status=status)


@dataclass(frozen=True)
class Generation:
    """What an engine returned for one request of a call (``prompt_ids``: the prompt as the engine
    tokenized it, when it said; a sample cut short continues from prompt + its tokens)."""

    samples: tuple[Sample, ...]
    prompt_tokens: int
    prompt_ids: tuple[int, ...] | None = None

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.samples)


@dataclass
class Partial:
    """One sample's output as it streams in: the transport fills it, the pool reads it when a call is cut
    short (an engine died, weights changed) and continues the sample from there instead of starting over."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    text: str = ""
    prompt_token_ids: list[int] | None = None
    finish_reason: str | None = None
    # The transport does not stream this call: no tokens here means "unknown", not "none yet" (a keep-mode
    # weight update then cannot say where the new weights began in the sample).
    blind: bool = False


Progress = list[list[Partial]]  # [request][sample]


def new_progress(requests: Sequence[Request]) -> Progress:
    return [[Partial() for _ in range(r.n)] for r in requests]


class EngineClient(Protocol):
    """All engine I/O goes through this; tests of policy may implement it in memory.

    A client that can report output as it arrives sets ``reports_progress = True`` and accepts
    ``generate(requests, progress=...)``: it fills ``progress[i][j]`` for request ``i``, sample ``j``
    (:func:`new_progress`); it decides itself when that is worth the cost (e.g. streaming long calls only).

    A client that can keep an engine's prefix cache apart per weight version sets ``salts_prefix_cache = True``
    and accepts ``generate(requests, weight_version=v)``: ``v`` is the version the call runs under
    (``Call.version``), so no call reuses KV blocks computed under other weights (vLLM's ``cache_salt``).

    A client that can end one call engine-side, answered with the tokens so far (vLLM's ``/abort_requests``:
    finish reason ``abort``), sets ``aborts_calls = True``, accepts ``generate(requests, call_id=...)`` and has
    ``async abort_call(call_id, requests)`` (``requests``: how many the call carried). Without it, a call
    moved off its engine starts over unless it streamed.
    """

    name: str

    async def generate(self, requests: Sequence[Request]) -> list[Generation]: ...

    async def healthy(self) -> bool: ...

    async def metrics(self) -> str | None:
        """The engine's Prometheus text, or None when it has none (hosted APIs) or did not answer."""
        ...

    async def aclose(self) -> None: ...


def check_reply(name: str, requests: Sequence[Request], generations: Sequence[Generation]) -> None:
    """Any client's answer must hold one generation per request and ``n`` samples each; else :class:`Malformed`.

    The dispatcher trusts no client (the simulator's, an injected one): a short reply would leave ids unresolved.
    """
    if len(generations) != len(requests):
        raise Malformed(f"{name}: {len(generations)} generations for {len(requests)} requests")
    for request, gen in zip(requests, generations):
        if len(gen.samples) != request.n:
            raise Malformed(f"{name}: {request.id}: {len(gen.samples)} samples for n={request.n}")
