"""Trainer weights -> every engine of the pool, then a new weight version.

CPU (and any setup with a folder every engine can read): the trainer writes its parameters as
safetensors into ``weights_dir`` and each engine reloads them in place (vLLM dev mode:
``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": ...}}``), then its
prefix cache is reset, since cached KV blocks were computed with the old weights. The pool is
paused around the load (:meth:`RolloutPool.weight_update`), so every result after it carries the
new version and none mixes old and new weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    import torch

    from rollout_plugin.pool.pool import RolloutPool, SyncRolloutPool

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def named_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` pairs vLLM's ``load_weights`` accepts, PEFT adapters merged in.

    Covers plain and DDP-wrapped models and PEFT; sharded models (FSDP, ZeRO-3) must be gathered by
    the caller (TRL's own ``VLLMGeneration._iter_named_params`` does that)."""
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
    version: int
    write_s: float
    load_s: float

    @property
    def total_s(self) -> float:
        return self.write_s + self.load_s


async def reload_engines(pool: RolloutPool, folder: str, version: int, *, abort: bool = False,
                         timeout_s: float | None = None) -> None:
    """Pause the pool, have every engine reload ``folder`` in place, reset prefix caches, resume at ``version``."""
    body = {"method": "reload_weights", "kwargs": {"weights_path": folder}}
    if timeout_s is not None:
        body["timeout"] = timeout_s
    async with pool.weight_update(version, abort=abort):
        await pool.call_engines("/collective_rpc", body, timeout_s=timeout_s)
        answers = await pool.call_engines("/reset_prefix_cache", timeout_s=timeout_s)
        if not all((a or {}).get("success", True) for a in answers):
            # Only fails while blocks are held; the pool is drained here, so this is a real problem.
            log.warning("reset_prefix_cache did not succeed on every engine: %s", answers)


class WeightSync:
    """Publishes a model's weights to the pool's engines, once per ``version`` (repeat calls are no-ops)."""

    def __init__(self, pool: SyncRolloutPool, weights_dir: str | Path, *, dtype: Any = None,
                 abort_inflight: bool = False, timeout_s: float | None = 600.0):
        self.pool = pool
        self.folder = Path(weights_dir).resolve()  # the engines resolve it in their own working directory
        self.dtype = dtype
        self.abort_inflight = abort_inflight
        self.timeout_s = timeout_s
        self.version: int | None = None
        self.history: list[SyncRecord] = []

    def sync(self, model: Any, version: int) -> SyncRecord | None:
        if version == self.version:
            return None
        if self.version is not None and version < self.version:
            raise TrainerAdapterError(f"weight version went back from {self.version} to {version}")
        t0 = time.perf_counter()
        write_weights(named_weights(model), self.folder, self.dtype)
        t1 = time.perf_counter()
        folder, abort, timeout = str(self.folder), self.abort_inflight, self.timeout_s
        self.pool.run(lambda p: reload_engines(p, folder, version, abort=abort, timeout_s=timeout))
        record = SyncRecord(version, t1 - t0, time.perf_counter() - t1)
        log.info("weights: version %s -> %d (write %.2fs, reload %.2fs)", self.version, version,
                 record.write_s, record.load_s)
        self.version = version
        self.history.append(record)
        return record
