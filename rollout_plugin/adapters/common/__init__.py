"""What every trainer adapter needs, independent of the trainer: the parts a third adapter reuses.

* :mod:`.translate` — prompts (text or chat, rendered with the trainer's tokenizer and chat template
  options) -> pool requests; results -> token ids, logprobs and weight versions, holes refused;
* :mod:`.versions` — which weights made which tokens (``(version, start, end)`` spans, a group's
  staleness version);
* :mod:`.weights` — :class:`FolderPublisher`: named tensors -> every engine, as a new weight version;
* :mod:`.ranks` — the collectives that let every rank of a multi-process trainer use one pool on the
  main process;
* :mod:`.metrics` — pool snapshots as ``rollout_pool/*`` log metrics.

``docs/adapters.md`` walks through a new adapter; :mod:`.skeleton` is its code, run by the tests.
Imports neither a trainer library nor torch (those load on first use).
"""

from rollout_plugin.adapters.common.metrics import PREFIX, PoolLogMetrics
from rollout_plugin.adapters.common.ranks import Collectives, check_one_pool, everyone, on_main, share_groups
from rollout_plugin.adapters.common.translate import (
    checked,
    group_key,
    group_requests,
    render_prompt,
    render_prompts,
    sample_logprobs,
    unpack,
)
from rollout_plugin.adapters.common.versions import Span, completion_spans, staleness_version, versions_spanned
from rollout_plugin.adapters.common.weights import FolderPublisher, SyncRecord, named_weights, write_weights
from rollout_plugin.types import oldest_version

__all__ = [
    "PREFIX",
    "Collectives",
    "FolderPublisher",
    "PoolLogMetrics",
    "Span",
    "SyncRecord",
    "check_one_pool",
    "checked",
    "completion_spans",
    "everyone",
    "group_key",
    "group_requests",
    "named_weights",
    "oldest_version",
    "on_main",
    "render_prompt",
    "render_prompts",
    "sample_logprobs",
    "share_groups",
    "staleness_version",
    "unpack",
    "versions_spanned",
    "write_weights",
]
