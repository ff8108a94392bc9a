"""A trainer's weights -> every engine of the pool, as a new weight version (no trainer library needed).

The folder transport works on CPU and on any setup with a folder every engine can read: the trainer's
parameters are written as one safetensors file into that folder and each engine reloads it in place
(vLLM dev mode: ``POST /collective_rpc {"method": "reload_weights", ...}``), then resets its prefix cache,
since cached KV blocks were computed with the old weights. That is the pool's own
:class:`~rollout_plugin.pool.FolderWeights` under :meth:`RolloutPool.update_weights`, which pauses
admission around the load (every result after it carries the new version, none mixes old and new weights
unless the mode lets in-flight samples cross) and keeps the folder to refit an engine that restarts later.

:class:`FolderPublisher` is that, from any trainer: ``publish(named tensors, version)`` on the process that
holds the pool. Gathering sharded weights across ranks is the trainer's business (the TRL adapter's
:class:`~rollout_plugin.adapters.trl.weights.WeightSync` does it with accelerate, then publishes here).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rollout_plugin.pool import RolloutPool, SyncRolloutPool

__all__ = ["WEIGHTS_FILE", "FolderPublisher", "SyncRecord", "named_weights", "reload_engines", "write_weights"]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def named_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` pairs vLLM's ``load_weights`` accepts, PEFT adapters merged in.

    Covers plain and DDP-wrapped ``torch.nn.Module`` s and PEFT in one process; a (possibly sharded)
    model spread over ranks must be gathered first (the TRL adapter's :mod:`~rollout_plugin.adapters.trl.gather`)."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "merge_adapter") and hasattr(model, "peft_config"):
        model.merge_adapter()
        try:
            prefix = getattr(model, "prefix", "lora_")
            for name, param in model.named_parameters():
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if prefix in name or "original_module" in name:
                    continue  # adapter tensors are merged; vLLM has no such parameters
                yield name.replace("modules_to_save.default.", ""), param.detach()
        finally:
            model.unmerge_adapter()
        return
    for name, param in model.named_parameters():
        yield name.replace("_checkpoint_wrapped_module.", ""), param.detach()


def write_weights(weights: Iterable[tuple[str, torch.Tensor]], folder: Path, dtype: Any = None) -> Path:
    """Write ``weights`` as one safetensors file in ``folder`` (atomically: engines never read half a file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: (t.to(dtype) if dtype is not None else t).contiguous().cpu() for name, t in weights}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp))
    final = folder / WEIGHTS_FILE
    os.replace(tmp, final)
    return final


@dataclass(frozen=True)
class SyncRecord:
    """One published version and where its time went (seconds)."""

    version: int
    write_s: float  # safetensors written (folder transport)
    load_s: float  # the engines loading it: in-place reload, or the NCCL transfer
    gather_s: float = 0.0  # reading the full weights (across ranks under ZeRO-3 / FSDP)
    ranks: int = 1
    sharding: str = "single"  # see rollout_plugin.adapters.trl.gather.sharding
    transport: str = "folder"

    @property
    def total_s(self) -> float:
        return self.gather_s + self.write_s + self.load_s


async def reload_engines(pool: RolloutPool, folder: str, version: int, *, abort: bool = False,
                         timeout_s: float | None = None, mode: str | None = None,
                         max_staleness: int | None = None) -> None:
    """Every engine reloads ``folder`` in place (prefix caches reset) under the pool's weight update, and the
    pool resumes at ``version``. The pool keeps the folder as its weight source: an engine that restarts
    later is refit from it before it rejoins. ``mode`` (default ``drain``; ``restart`` with ``abort``) and
    ``max_staleness``: how work still generating crosses the update (:class:`rollout_plugin.pool.UpdateMode`)."""
    from rollout_plugin.pool import FolderWeights

    await pool.update_weights(version, FolderWeights(folder, timeout_s=timeout_s),
                              mode=mode or ("restart" if abort else "drain"), max_staleness=max_staleness)


class FolderPublisher:
    """Publishes named tensors to every engine of ``pool`` through ``folder``, one weight version per call.

    ``mode`` (``drain`` by default, ``restart``, ``keep``, ``continue``) and ``max_staleness``: how work still
    generating crosses each update. ``folder`` must be readable by every engine (resolved here: the engines
    resolve a relative path in their own working directory)."""

    def __init__(self, pool: SyncRolloutPool, folder: str | Path, *, mode: str | None = None,
                 max_staleness: int | None = None, timeout_s: float | None = 600.0, dtype: Any = None):
        self.pool = pool
        self.folder = Path(folder).resolve()
        self.mode = str(getattr(mode, "value", mode)) if mode is not None else None
        self.max_staleness = max_staleness
        self.timeout_s = timeout_s
        self.dtype = dtype

    def publish(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncRecord:
        """Write ``weights``, have every engine load them, and resume the pool at ``version`` (blocking)."""
        t0 = time.perf_counter()
        write_weights(weights, self.folder, self.dtype)
        t1 = time.perf_counter()
        folder, mode, staleness, timeout = str(self.folder), self.mode, self.max_staleness, self.timeout_s
        self.pool.run(lambda p: reload_engines(p, folder, version, timeout_s=timeout, mode=mode,
                                               max_staleness=staleness))
        record = SyncRecord(version, write_s=t1 - t0, load_s=time.perf_counter() - t1)
        log.debug("weights: version %d published from %s (write %.2fs, load %.2fs)", version, folder,
                  record.write_s, record.load_s)
        return record
