"""The trainer's full weights, one parameter at a time, gathered across ranks exactly as TRL's server mode does.

TRL 1.16's ``VLLMGeneration._iter_named_params`` gathers each parameter under DeepSpeed ZeRO-3
(``GatheredParameters``), FSDP1 (``summon_full_params``) and FSDP2 (``DTensor.full_tensor()``), merges
PEFT adapters, and names each tensor as vLLM's ``load_weights`` expects. We run that same code
(TRL's, not a copy) without the rest of ``VLLMGeneration``: under ZeRO-3 and FSDP each step is a
collective, so every rank iterates it to the end, in step; under DDP (or one process) nothing is
sharded and only the main process needs to read the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["gathered_params", "is_collective", "sharding"]


def sharding(accelerator: Any) -> str:
    """How the trainer holds its weights: ``zero3``, ``fsdp1``, ``fsdp2``, ``zero1/2``, ``ddp`` or ``single``."""
    from trl.distributed import DistributedBackend

    dist = DistributedBackend(accelerator)
    if dist.is_zero3:
        return "zero3"
    if dist.is_fsdp:
        return f"fsdp{dist.fsdp_version}"
    if dist.zero_stage:
        return f"zero{dist.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def is_collective(accelerator: Any) -> bool:
    """Whether reading the full weights is a collective every rank must take part in."""
    return sharding(accelerator) in ("zero3", "fsdp1", "fsdp2")


def gathered_params(model: Any, accelerator: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(vLLM name, full tensor)`` per parameter, materialized one at a time (TRL's own iteration).

    The tensor is only valid until the next step (ZeRO-3 re-partitions it on the way): copy what you keep.
    ``model`` is the trainer's model as TRL holds it (``trainer.model``; a DDP wrapper is looked through)."""
    from torch.nn.parallel import DistributedDataParallel
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    if isinstance(model, DistributedDataParallel):
        model = model.module
    # Only the iteration: none of VLLMGeneration's vLLM set-up runs (its __init__ would start a client).
    it = object.__new__(VLLMGeneration)
    it.model, it.accelerator, it._dist = model, accelerator, DistributedBackend(accelerator)
    return it._iter_named_params()
