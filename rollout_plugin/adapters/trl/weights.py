"""Trainer weights -> every engine of the pool, then a new weight version.

CPU (and any setup with a folder every engine can read): the trainer writes its parameters as
safetensors into ``weights_dir`` and each engine reloads them in place (vLLM dev mode:
``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": ...}}``), then its
prefix cache is reset, since cached KV blocks were computed with the old weights — the pool's own
:class:`~rollout_plugin.pool.weights.FolderWeights` under :meth:`RolloutPool.update_weights`, which
pauses around the load (every result after it carries the new version, none mixes old and new
weights) and keeps the folder to refit an engine that restarts later.

Several ranks: every rank calls :meth:`WeightSync.sync`; the weights are gathered as TRL's server
mode gathers them (:mod:`.gather`), the main process writes and reloads. GPU engines can take the
weights over NCCL instead (``transport="nccl"``, :mod:`.nccl`).
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

    Covers plain and DDP-wrapped models and PEFT in one process; a trainer's (possibly sharded) model
    goes through :func:`.gather.gathered_params` instead (:class:`WeightSync` does that when it has the
    trainer's accelerator)."""
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
    sharding: str = "single"  # see gather.sharding
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
    ``max_staleness``: how work still generating crosses the update (:mod:`rollout_plugin.pool.weights`)."""
    from rollout_plugin.pool.weights import FolderWeights

    await pool.update_weights(version, FolderWeights(folder, timeout_s=timeout_s),
                              mode=mode or ("restart" if abort else "drain"), max_staleness=max_staleness)


class WeightSync:
    """Publishes the trainer's weights to the pool's engines, once per ``version`` (repeat calls are no-ops).

    Under ``accelerate launch`` every rank holds one and calls :meth:`sync` with the same version: the
    gather is a collective under ZeRO-3 / FSDP. The main process holds the pool (``None`` elsewhere),
    writes and loads; every rank gets its :class:`SyncRecord`, or its failure.

    ``transport``: ``folder`` (safetensors in ``weights_dir``, reloaded in place by every engine; CPU and
    GPU) or ``nccl`` (vLLM's NCCL weight-transfer engine, GPU only: see :mod:`.nccl`)."""

    def __init__(self, pool: SyncRolloutPool | None, weights_dir: str | Path, *, accelerator: Any = None,
                 transport: str = "folder", nccl: Any = None, dtype: Any = None, abort_inflight: bool = False,
                 timeout_s: float | None = 600.0):
        self.pool = pool
        self.folder = Path(weights_dir).resolve()  # the engines resolve it in their own working directory
        self.accelerator = accelerator
        self.transport = str(getattr(transport, "value", transport))
        if self.transport not in ("folder", "nccl"):
            raise TrainerAdapterError(f"weights.transport={self.transport!r}: not a transport (try "
                                      f"weights.transport=folder)")
        self.dtype = dtype
        self.abort_inflight = abort_inflight
        self.timeout_s = timeout_s
        self._nccl = None
        if self.transport == "nccl":
            from rollout_plugin.adapters.trl.nccl import NcclTransport

            self._nccl = NcclTransport(pool, accelerator, options=nccl, abort_inflight=abort_inflight,
                                       timeout_s=timeout_s)
        self.version: int | None = None
        self.history: list[SyncRecord] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def sync(self, model: Any, version: int) -> SyncRecord | None:
        """Publish ``model``'s weights as ``version`` (every rank calls this; see the class docstring)."""
        if version == self.version:
            return None
        if self.version is not None and version < self.version:
            raise TrainerAdapterError(f"weight version went back from {self.version} to {version}")
        def publish() -> SyncRecord | None:
            if self.is_main and self.pool is None:
                raise TrainerAdapterError("the main process has no rollout pool to sync weights to: pass one to "
                                          "attach() (rollout_plugin.trl.make_pool builds it on the main process)")
            if self._nccl is not None:
                return self._nccl.send(model, version)
            return self._publish_folder(model, version)

        if self.accelerator is None:
            record = publish()
        else:
            from rollout_plugin.adapters.trl.ranks import everyone

            record = everyone(self.accelerator, publish)
        if self.is_main:
            log.info("weights: version %s -> %d (%s: gather %.2fs on %d rank(s) [%s], write %.2fs, load %.2fs)",
                     self.version, version, record.transport, record.gather_s, record.ranks, record.sharding,
                     record.write_s, record.load_s)
        self.version = version
        self.history.append(record)
        return record

    def _params(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        if self.accelerator is None:
            return named_weights(model)
        from rollout_plugin.adapters.trl.gather import gathered_params

        return gathered_params(model, self.accelerator)

    def _publish_folder(self, model: Any, version: int) -> SyncRecord | None:
        """Gather (every rank that must), write and reload (main process); the main process's record."""
        from rollout_plugin.adapters.trl.gather import is_collective, sharding

        acc = self.accelerator
        t0 = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        if self.is_main or is_collective(acc):
            for name, tensor in self._params(model):
                if self.is_main:  # a copy: under ZeRO-3 the gathered tensor is freed at the next step
                    tensors[name] = tensor.detach().to(device="cpu", dtype=self.dtype or tensor.dtype, copy=True)
        t1 = time.perf_counter()
        if not self.is_main:
            log.debug("weights: rank %d took part in the gather of version %d (%.2fs)", acc.process_index,
                      version, t1 - t0)
            return None
        write_weights(tensors.items(), self.folder)
        t2 = time.perf_counter()
        folder, abort, timeout = str(self.folder), self.abort_inflight, self.timeout_s
        self.pool.run(lambda p: reload_engines(p, folder, version, abort=abort, timeout_s=timeout))
        return SyncRecord(version, write_s=t2 - t1, load_s=time.perf_counter() - t2, gather_s=t1 - t0,
                          ranks=acc.num_processes if acc is not None else 1,
                          sharding=sharding(acc) if acc is not None else "single")
