"""Which weights made a completion, as an adapter hands it on (no trainer, torch or vLLM needed).

A sample continued across a weight update (``keep`` / ``continue``) or onto another engine carries
:class:`~rollout_plugin.types.Segment` s: weight version ``v`` produced output tokens ``[start, end)``.
Adapters pass them on as plain tuples ``(version, start, end)`` (``None`` for a boundary the pool could
not see), so reward functions and logs need no import of ours. The oldest version of a set of samples is
the pool's own :func:`rollout_plugin.types.oldest_version` (one definition for the pool and every adapter).
The TRL routes use them so:

* backend and ``rollout_func``: ``weight_version`` (the completion's oldest version) and
  ``weight_segments`` (its spans) per completion;
* async (``AsyncGRPOTrainer``): a group's ``model_version`` is :func:`staleness_version`.
"""

from __future__ import annotations

from rollout_plugin.types import Result, Sample, oldest_version

__all__ = ["Span", "completion_spans", "oldest_version", "staleness_version", "versions_spanned"]

Span = tuple[int, int | None, int | None]  # (weight version, first output token, end), end exclusive


def completion_spans(sample: Sample, fallback: int) -> list[Span]:
    """``sample``'s spans in token order; one span under ``fallback`` (its result's version) when the engine
    reported none (a client that does not track segments): every token then came from that version."""
    if not sample.segments:
        return [(fallback, 0, sample.output_tokens)]
    return [(s.version, s.start, s.end) for s in sample.segments]


def versions_spanned(sample: Sample) -> int:
    """How many weight versions produced ``sample`` (1 unless it crossed a weight update)."""
    return max(len(sample.versions), 1)


def staleness_version(result: Result) -> int:
    """The version a whole group is judged by for staleness: the oldest weights any of its tokens came from.

    AsyncGRPOTrainer drops a sample when ``trainer.model_version - sample.model_version > max_staleness``; its
    own worker tags a group with the version live when the group was *submitted*, i.e. the oldest one (its
    vLLM pauses with ``mode=keep``, so its groups span versions too). We keep that meaning: the bound then
    says "no token of a trained sample came from weights more than ``max_staleness`` versions old". A
    token-weighted version (or the newest) would let a sample whose first tokens are older than the bound
    through, and it is the first tokens, conditioning all the rest, that are most off-policy. Judging the
    group rather than each sample keeps a GRPO group whole: its advantages were normalised over all k, so
    the trainer drops or keeps all k together, as with its own worker. A sample without segments counts as
    made wholly by the result's version."""
    wv = result.weight_version
    return min((oldest_version([s], wv) for s in result.samples), default=wv)
