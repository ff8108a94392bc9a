"""Samples cut short continue where they stopped: prefixes, segments and the plan for a cut unit (pure).

A call can end before its samples did: an engine died mid-call (the pool saw the tokens streamed so far),
or the weights changed under ``mode=continue`` (vLLM aborted the request and answered with the tokens it
had). Each unfinished sample then continues as its own request — its prompt and the tokens it has as the
new prompt, the rest of its budget — on any engine, under the weights of the moment; its
:class:`~rollout_plugin.types.Segment` s record which version produced which tokens. No generated token is
thrown away unless there is nothing to continue from (no prompt ids, no tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rollout_plugin.pool.core.engine_client import Partial
from rollout_plugin.pool.core.ledger import Prefix
from rollout_plugin.types import Sample, Segment

__all__ = ["ABORTED", "Plan", "join_prefix", "partial_sample", "plan", "segments"]

ABORTED = "abort"  # vLLM's finish reason for a request aborted engine-side (pause mode=abort, abort_requests)

# (tokens of each sample received when the weights changed, or None if unknown; the new version)
Mark = tuple[list[list[int]] | None, int]


def segments(version: int, marks: Sequence[Mark], i: int, j: int, length: int) -> tuple[Segment, ...]:
    """Which versions produced tokens ``[0, length)`` of sample ``j`` of request ``i`` of a call sent under
    ``version``, across the ``keep`` weight updates (marks) it was frozen through."""
    out: list[Segment] = []
    start: int | None = 0
    for counts, new in marks:
        cut = min(counts[i][j], length) if counts is not None else None
        if cut is None or start is None or cut > start:
            out.append(Segment(version, start, cut))
        start, version = cut, new
    if start is None or start < length or not out:
        out.append(Segment(version, start, length))
    return tuple(out)


def join_prefix(prefix: Prefix | None, sample: Sample, segs: tuple[Segment, ...]) -> Sample:
    """``sample`` (with its own segments ``segs``, counted from 0) after the tokens its ``prefix`` had."""
    if prefix is None:
        return Sample(sample.text, sample.token_ids, sample.logprobs, sample.finish_reason, segs)
    head = prefix.sample
    shift = head.output_tokens
    moved = tuple(Segment(s.version, None if s.start is None else s.start + shift,
                          None if s.end is None else s.end + shift) for s in segs)
    logprobs = (head.logprobs + sample.logprobs) if head.logprobs is not None and sample.logprobs is not None else None
    merged = head.segments + moved
    if head.segments and moved and head.segments[-1].version == moved[0].version \
            and head.segments[-1].end is not None and head.segments[-1].end == moved[0].start:
        # one version on both sides of the cut: one span
        merged = head.segments[:-1] + (Segment(moved[0].version, head.segments[-1].start, moved[0].end),) + moved[1:]
    return Sample(head.text + sample.text, (head.token_ids or ()) + (sample.token_ids or ()), logprobs,
                  sample.finish_reason, merged)


def partial_sample(p: Partial, version: int) -> Sample:
    """What a streamed sample had when its call was cut (its finish reason too, if it had finished)."""
    return Sample(p.text, tuple(p.token_ids), tuple(p.logprobs) if p.logprobs is not None else None,
                  p.finish_reason, (Segment(version, 0, len(p.token_ids)),) if p.token_ids else ())


@dataclass
class Plan:
    """What becomes of a cut unit's samples."""

    finished: list[Sample] = field(default_factory=list)  # done before the cut: kept as they are
    continued: list[Prefix] = field(default_factory=list)  # each continues alone from its tokens
    fresh: int = 0  # nothing to continue from: generated again

    @property
    def trivial(self) -> bool:
        """Nothing kept: the unit is simply sent again."""
        return not self.finished and not self.continued


def plan(samples: Sequence[Sample | None], prompt_ids: Sequence[int] | None, max_tokens: int,
         prefix: Prefix | None = None) -> Plan:
    """``samples``: each sample as far as it got (``None``: nothing known), already joined to the unit's
    ``prefix``; ``prompt_ids``: the original prompt's token ids (None: unknown, nothing can continue)."""
    out = Plan()
    for s in samples:
        have = s.output_tokens if s is not None else 0
        if s is not None and s.finish_reason not in (None, ABORTED):
            out.finished.append(s)
        elif s is not None and have >= max_tokens:  # it used its whole budget: done by length
            out.finished.append(Sample(s.text, s.token_ids, s.logprobs, "length", s.segments))
        elif s is not None and have and prompt_ids is not None and (prefix is None or have > prefix.tokens):
            out.continued.append(Prefix(tuple(prompt_ids), s))
        elif prefix is not None:
            out.continued.append(prefix)  # no new tokens: it continues from the prefix it had
        else:
            out.fresh += 1
    return out
