"""vLLM's automatic prefix cache, per simulated engine: hashed full blocks, reference counts, LRU eviction.

What it copies (vLLM 0.32, ``vllm/v1/core/``):

- A block's identity is its tokens *and everything before them* (``kv_cache_utils.py`` ``hash_block_tokens``
  chains each full block's hash to its parent's), so the same tail after a different prefix is a miss. Only full
  blocks are cached; a prompt's lookup stops at its first miss (``find_longest_cache_hit``) and never covers the
  last prompt token (``kv_cache_manager.py`` ``get_computed_blocks``: ``max_cache_hit_length = num_tokens - 1``).
- Blocks held by running requests are shared by reference count (``block_pool.py`` ``touch``); a request's blocks
  are freed tail first (``single_type_kv_cache_manager.py`` frees ``reversed(blocks)``) onto the free queue,
  whose front is evicted first when KV is needed (``get_new_blocks`` pops the least recently freed): LRU.
- Generated tokens' full blocks are cached too, so a session's next turn (previous prompt + its answer + the
  tool output) finds all but the new tail.
- ``/reset_prefix_cache`` drops every hash (``block_pool.py`` ``reset_prefix_cache``): after a weight update
  no block hits.
- Hit statistics count new requests only; a preempted request's re-lookup is kept apart (``metrics/stats.py``
  ``PrefixCacheStats.record(preempted=...)``).

Token content is described, not stored: a prompt is a tuple of segments ``(content_id, length)`` — the group's
first prompt, a turn's answer, a tool's output — each id naming distinct content. A block ending ``offset``
tokens into segment ``j`` is identified by the segments before ``j`` (ids and lengths), ``j``'s id and
``offset``: equal exactly when every token from the start through the block's end is, as vLLM's chain hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

__all__ = ["Content", "PrefixCache", "Reused", "block_ids", "output_segment", "usable_blocks"]

Content = tuple[tuple[Hashable, int], ...]
"""A token sequence as segments ``(content_id, length)``: equal ids, equal tokens."""


def output_segment(request_id: str, sample: int) -> Hashable:
    """The content id of sample ``sample``'s generated tokens: a later prompt that resends them names this id."""
    return ("out", request_id, sample)


def block_ids(content: Content, block_size: int, skip: int = 0) -> list[int]:
    """Chain identities of ``content``'s full blocks, in order (a partial last block has none); ``skip``: only
    the blocks that end in segments from this index on (what extending a content by them adds)."""
    out: list[int] = []
    before = 0  # hash of the segments before this one: the block's prefix
    pos = 0  # tokens before this segment
    for i, (seg_id, length) in enumerate(content):
        if i >= skip:
            first = -pos % block_size or block_size  # offset of this segment's first block end
            out.extend(hash((before, seg_id, offset)) for offset in range(first, length + 1, block_size))
        before = hash((before, seg_id, length))
        pos += length
    return out


def usable_blocks(prompt_tokens: int, block_size: int) -> int:
    """Most blocks a lookup may hit: full blocks before the prompt's last token, which is always computed."""
    return max(0, prompt_tokens - 1) // block_size


@dataclass
class Reused:
    """Blocks computed so far anywhere in one run, per weight epoch (the hit rate's denominator)."""

    epochs: dict[int, set[int]] = field(default_factory=dict)

    def leading(self, epoch: int, ids: Sequence[int], limit: int) -> int:
        seen = self.epochs.get(epoch)
        if not seen:
            return 0
        n = 0
        for h in ids[:limit]:
            if h not in seen:
                break
            n += 1
        return n

    def add(self, epoch: int, ids: Sequence[int]) -> None:
        self.epochs.setdefault(epoch, set()).update(ids)


class PrefixCache:
    """One engine's cache. ``refs``: blocks held by running sequences (hit-able, not evictable); ``free``:
    unreferenced cached blocks, least recently freed first (evicted first). ``reused``: the run's shared
    registry of computed blocks (``None``: no hit-rate denominator is kept)."""

    def __init__(self, block_size: int, reused: Reused | None = None):
        self.block_size = block_size
        self.reused = reused
        self.epoch = 0  # weight epochs: bumped by every reset, so old blocks never count as reusable
        self.refs: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict()
        # vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits (new requests only), and the tokens an
        # earlier request on any engine had computed (what perfect routing would have hit).
        self.queries = 0
        self.hits = 0
        self.reusable = 0
        self.evictions = 0

    def __contains__(self, h: int) -> bool:
        return h in self.refs or h in self.free

    def _leading(self, ids: Sequence[int], limit: int) -> int:
        refs, free = self.refs, self.free
        n = 0
        for h in ids[:limit]:
            if h not in refs and h not in free:
                break
            n += 1
        return n

    def peek(self, ids: Sequence[int], prompt_tokens: int) -> int:
        """Tokens a lookup would find now, counting nothing."""
        return self._leading(ids, usable_blocks(prompt_tokens, self.block_size)) * self.block_size

    def lookup(self, ids: Sequence[int], prompt_tokens: int) -> int:
        """A new request's cached tokens (full leading blocks); counts its query, hits and reusable tokens."""
        limit = usable_blocks(prompt_tokens, self.block_size)
        n = self._leading(ids, limit)
        self.queries += prompt_tokens
        self.hits += n * self.block_size
        if self.reused is not None:
            # Every block here was computed under this epoch, so the registry covers at least the hit.
            self.reusable += max(n, self.reused.leading(self.epoch, ids, limit)) * self.block_size
        return n * self.block_size

    def acquire(self, ids: Sequence[int]) -> None:
        """A sequence holds these blocks (hit ones leave the free queue; missed ones are computed now)."""
        refs, free = self.refs, self.free
        for h in ids:
            c = refs.get(h)
            if c is None:
                free.pop(h, None)
                refs[h] = 1
            else:
                refs[h] = c + 1
        if self.reused is not None:
            self.reused.add(self.epoch, ids)

    def release(self, ids: Sequence[int], generated: Sequence[int] = ()) -> None:
        """A sequence lets go of its prompt's blocks ``ids`` and caches the full blocks it ``generated`` (never
        acquired): unreferenced ones join the free queue tail first, so a chain's tail is evicted before its head."""
        refs, free = self.refs, self.free
        for h in reversed(generated):
            free.pop(h, None)
            free[h] = None
        for h in reversed(ids):
            c = refs.get(h, 0)
            if c > 1:
                refs[h] = c - 1
                continue
            if c:
                del refs[h]
            free.pop(h, None)
            free[h] = None
        if generated and self.reused is not None:
            self.reused.add(self.epoch, generated)

    def trim(self, room_blocks: int) -> None:
        """Evict least recently freed blocks until the free ones fit in ``room_blocks`` (KV not in use)."""
        free = self.free
        while len(free) > max(0, room_blocks):
            free.popitem(last=False)
            self.evictions += 1

    def reset(self) -> None:
        """``/reset_prefix_cache``: nothing computed before hits again (held blocks are dropped by their
        sequences, which the engine re-prefills)."""
        self.refs.clear()
        self.free.clear()
        self.epoch += 1
