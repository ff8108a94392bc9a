"""TRL's trainer weights -> every engine of the pool, then a new weight version.

CPU (and any setup with a folder every engine can read): the main process publishes the parameters
through :class:`~rollout_plugin.adapters.common.weights.FolderPublisher` (safetensors in ``weights_dir``,
reloaded in place by every engine under the pool's weight update).

Several ranks: every rank calls :meth:`WeightSync.sync`; the weights are gathered as TRL's server
mode gathers them (:mod:`.gather`), the main process writes and reloads. GPU engines can take the
weights over NCCL instead (``transport="nccl"``, :mod:`.nccl`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.common.ranks import everyone
from rollout_plugin.adapters.common.weights import FolderPublisher, SyncRecord, named_weights
from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    import torch

    from rollout_plugin.pool import SyncRolloutPool

log = logging.getLogger(__name__)


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
        self._folder = FolderPublisher(pool, self.folder, mode="restart" if abort_inflight else None,
                                       timeout_s=timeout_s)
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
        record = self._folder.publish(tensors.items(), version)
        return dataclasses.replace(record, gather_s=t1 - t0, ranks=acc.num_processes if acc is not None else 1,
                                   sharding=sharding(acc) if acc is not None else "single")
