"""Which GPUs each launched engine gets: inventory and config in, one device set per engine out.

Every local engine is a separate vLLM server; without its own ``CUDA_VISIBLE_DEVICES`` each one would
open cuda:0, next to the others and next to the trainer. :func:`place_engines` is pure: it takes the
GPUs this process may see (:func:`gpu_inventory`, the one function here that looks at the machine) and
the engine config, and returns ``tensor_parallel_size`` GPUs per engine, disjoint from each other and —
unless ``engine.colocate`` — from ``engine.trainer_devices``. Impossible layouts raise one
:class:`~rollout_plugin.errors.ConfigError` naming the key, before any engine starts. No GPUs at all
(CPU engines): every engine gets ``None`` and its environment is left as it is.

The Ray backend does not come here: Ray gives each replica its GPUs and sets the actor's
``CUDA_VISIBLE_DEVICES``, which the engine inherits (:mod:`rollout_plugin.pool.engines.ray_backend`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.config.validate import Problems, check_placement

log = logging.getLogger(__name__)

# vLLM's own default: an engine alone on its GPUs takes 90 % of each for weights, activations and KV.
DEDICATED_UTILIZATION = 0.9
_NO_DEVICES = ("", "-1", "none", "nodevfiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs this process may hand out, as ``CUDA_VISIBLE_DEVICES`` names them (indexes or UUIDs)."""

    devices: tuple[str, ...] = ()
    source: str = "none"  # where the list came from, for messages
    memory_gib: Optional[float] = None  # the smallest GPU's memory (nvidia-smi), for the colocated fraction


@dataclass(frozen=True)
class Placement:
    """Per engine: its GPUs (``None``: leave the environment alone) and the memory fraction it may take."""

    devices: tuple[Optional[tuple[str, ...]], ...]
    gpu_memory_utilization: float
    summary: str  # one line for the log

    def env(self, index: int) -> dict[str, str]:
        """Environment the engine at ``index`` adds to its own (nothing for CPU engines)."""
        mine = self.devices[index] if index < len(self.devices) else None
        return {} if mine is None else {"CUDA_VISIBLE_DEVICES": ",".join(mine)}


def gpu_inventory(environ: Mapping[str, str] | None = None, nvidia_smi: str = "nvidia-smi") -> GpuInventory:
    """GPUs visible here: an existing ``CUDA_VISIBLE_DEVICES`` wins; else ``nvidia-smi``'s list; else none.

    Never imports torch (the pool runs beside trainers that have not touched CUDA yet, and on CPU boxes).
    """
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (visible.strip().lower() in _NO_DEVICES or not visible.strip(", ")):
        return GpuInventory((), f"CUDA_VISIBLE_DEVICES={visible!r}: no GPU")
    listed = _query_gpus(nvidia_smi)
    if visible is not None:
        ids = tuple(d.strip() for d in visible.split(",") if d.strip())
        mine = [m for index, m in listed or [] if index in ids] or [m for _, m in listed or []]
        return GpuInventory(ids, "CUDA_VISIBLE_DEVICES", _smallest(mine))
    if not listed:
        return GpuInventory((), "nvidia-smi: no GPU" if listed is not None else "no nvidia-smi")
    return GpuInventory(tuple(index for index, _ in listed), "nvidia-smi", _smallest([m for _, m in listed]))


def _smallest(memory: list[Optional[float]]) -> Optional[float]:
    """The smallest GPU's memory; None when any is unknown (a guess would size the colocated fraction)."""
    return None if not memory or None in memory else min(m for m in memory if m is not None)


def _query_gpus(nvidia_smi: str) -> Optional[list[tuple[str, Optional[float]]]]:
    """(index, memory GiB) per GPU from ``nvidia-smi`` (``-L``'s list, with memory); None without nvidia-smi."""
    exe = shutil.which(nvidia_smi)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): treating this machine as having no GPU", exc)
        return None
    gpus: list[tuple[str, Optional[float]]] = []
    for line in out.splitlines():
        index, _, mib = (part.strip() for part in line.partition(","))
        if index:
            try:
                gpus.append((index, float(mib) / 1024))
            except ValueError:  # "[N/A]" on some boards: the GPU counts, its memory is unknown
                gpus.append((index, None))
    return gpus


def keep_off_training_gpus(cfg: EngineConfig, inventory: GpuInventory, local_ranks: int) -> EngineConfig:
    """``cfg`` with ``engine.trainer_devices`` set to the GPUs of this node's ``local_ranks`` training ranks when
    it is unset (launched engines, ``engine.colocate`` false): an engine never lands on a training rank's GPU
    unless asked. ``accelerate launch`` / torchrun give local rank ``i`` ``cuda:i``, the ``i``-th visible GPU.

    The pool starts before the trainer loads its model: without this, vLLM takes 90 % of GPU 0 and the
    trainer then runs out of memory there."""
    if cfg.urls or cfg.colocate or cfg.trainer_devices or local_ranks < 1 or not inventory.devices:
        return cfg
    ranks = list(inventory.devices[:local_ranks])
    log.info("engine.trainer_devices unset -> [%s] (the %d training rank(s)' GPUs, from %s; engine.colocate=true "
             "shares them)", ",".join(ranks), local_ranks, inventory.source)
    return dataclasses.replace(cfg, trainer_devices=ranks)


def place_engines(inventory: GpuInventory, cfg: EngineConfig, engines: int, *,
                  colocated_utilization: Optional[float] = None) -> Placement:
    """One disjoint set of ``tensor_parallel_size`` GPUs per engine; raises :class:`ConfigError` naming the key.

    ``colocated_utilization``: the planner's fraction for engines sharing the trainer's GPUs, used when
    ``engine.colocate`` and ``engine.gpu_memory_utilization`` is unset.
    """
    p = Problems()
    check_placement(cfg, p, engines)
    tp = max(1, cfg.tensor_parallel_size)
    visible = inventory.devices
    wanted = list(dict.fromkeys(str(d) for d in cfg.devices))
    trainer = list(dict.fromkeys(str(d) for d in cfg.trainer_devices))
    if not visible:
        if wanted:
            p.add("engine.devices", wanted, f"no GPU is visible here ({inventory.source})", "[]")
        p.raise_if_any()
        util = cfg.gpu_memory_utilization or DEDICATED_UTILIZATION
        return Placement((None,) * engines, util, f"no GPU visible ({inventory.source}): engines run on the CPU")
    for key, ids in (("engine.devices", wanted), ("engine.trainer_devices", trainer)):
        hidden = [d for d in ids if d not in visible]
        if hidden:
            p.add(key, ids, f"GPU {','.join(hidden)} not visible here (visible: {','.join(visible)} from "
                  f"{inventory.source})", f"[{','.join(d for d in ids if d in visible)}]")
    pool = wanted or list(visible)
    usable = (pool if wanted or not trainer else trainer) if cfg.colocate else [d for d in pool if d not in trainer]
    if not any(item.key in ("pool.engines", "engine.tensor_parallel_size") for item in p.items):
        _check_count(p, usable, engines, tp, len(visible), wanted, trainer, cfg.colocate)
    util, why = _utilization(cfg, colocated_utilization, p)
    p.raise_if_any()
    devices = tuple(tuple(usable[i * tp:(i + 1) * tp]) for i in range(engines))
    spare = usable[engines * tp:]
    summary = (", ".join(f"engine{i} -> GPU {','.join(d)}" for i, d in enumerate(devices))
               + f" (from {'engine.devices' if wanted else inventory.source}; "
               + (f"colocated with the trainer's GPU {','.join(trainer)}" if cfg.colocate and trainer else
                  f"trainer's GPU {','.join(trainer)} left out" if trainer else "no engine.trainer_devices given")
               + (f"; unused: {','.join(spare)}" if spare else "") + f"; gpu_memory_utilization {util} {why})")
    return Placement(devices, util, summary)


def _check_count(p: Problems, usable: list[str], engines: int, tp: int, visible: int, wanted: list[str],
                 trainer: list[str], colocate: bool) -> None:
    need = engines * tp
    if need <= len(usable):
        return
    where = f"engine.devices lists {len(wanted)}" if wanted else f"{visible} visible"
    if trainer and not colocate:
        where += f" without the trainer's ({','.join(trainer)})"
    if not usable and trainer and not colocate:
        p.add("engine.colocate", False, f"no GPU left for engines: {where}: 0 usable; share the training ranks' "
              "GPUs on purpose (with engine.gpu_memory_utilization), or train on fewer ranks", True)
    elif tp > len(usable):
        p.add("engine.tensor_parallel_size", tp, f"one engine needs {tp} GPUs; {where}: {len(usable)} usable",
              max(1, len(usable)))
    else:
        p.add("pool.engines", engines, f"{engines} engines × engine.tensor_parallel_size {tp} need {need} GPUs; "
              f"{where}: {len(usable)} usable", len(usable) // tp)


def _utilization(cfg: EngineConfig, colocated: Optional[float], p: Problems) -> tuple[float, str]:
    if cfg.gpu_memory_utilization is not None:
        return cfg.gpu_memory_utilization, "(engine.gpu_memory_utilization)"
    if not cfg.colocate:
        return DEDICATED_UTILIZATION, "(dedicated GPUs)"
    if colocated is None:
        p.add("engine.gpu_memory_utilization", None, "unset with engine.colocate=true and no planner estimate "
              "(the model's config.json or the GPUs' memory is unknown): say how much of each GPU the engine "
              "may take next to the trainer", 0.5)
        return DEDICATED_UTILIZATION, ""
    return colocated, "(the planner's colocated fraction)"
