"""The pool as ``GRPOTrainer``'s (and ``RLOOTrainer``'s) generation backend.

TRL 1.16 generates through ``trainer.vllm_generation``: ``sync_weights()`` when the step changed,
then ``generate(prompts=token ids, images, num_generations)`` returning per-completion token ids
and per-token logprobs. :class:`PoolGeneration` keeps that contract, so TRL's chat templating, tool
loop and importance-sampling correction stay as they are; only where the tokens come from changes.
Like TRL's server mode it gathers every rank's prompts to rank 0, sends each distinct prompt once
as a group of ``num_generations`` (one ``n=k`` request), and hands each rank back its slice
(:func:`rollout_plugin.adapters.common.ranks.share_groups`); weights are gathered on every rank and published from rank 0
(:class:`.weights.WeightSync`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.common.ranks import check_one_pool, everyone, share_groups
from rollout_plugin.adapters.common.translate import checked, group_requests, unpack
from rollout_plugin.adapters.common.versions import Span
from rollout_plugin.adapters.trl.callback import RolloutPoolCallback, weight_sync
from rollout_plugin.adapters.trl.compat import require_trl
from rollout_plugin.adapters.trl.sampling import trainer_sampling, warn_biased_logprobs
from rollout_plugin.adapters.trl.weights import WeightSync
from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    from rollout_plugin.adapters.trl.config import WeightsConfig
    from rollout_plugin.pool import SyncRolloutPool

log = logging.getLogger(__name__)


class PoolGeneration:
    """Stands in for TRL's ``VLLMGeneration``: same ``sync_weights`` / ``generate`` contract, served by the pool.

    ``pool`` lives on the main process only (None elsewhere); every rank holds ``weights`` and calls both
    methods, as TRL's collectives require (gathering sharded weights, sharing prompts and completions)."""

    def __init__(self, trainer: Any, pool: SyncRolloutPool | None, weights: WeightSync):
        self.trainer = trainer
        self.model = trainer.model  # the model TRL's own backend would gather (before accelerate wraps it)
        self.pool = pool
        self.weights = weights
        self.accelerator = trainer.accelerator
        self.sampling = trainer_sampling(trainer)
        # This rank's completions of the last generation: the oldest weights of each, and each one's spans. TRL's
        # vLLM path passes no extra fields to reward functions (rollout_func does: weight_version, weight_segments).
        self.last_versions: list[int] = []
        self.last_segments: list[list[Span]] = []

    def sync_weights(self) -> None:
        self.weights.sync(self.model, self.trainer.state.global_step)

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int,
                 profiler: Any = None) -> tuple[list, list, list, list]:
        if images is not None and any(img is not None for img in images):
            raise TrainerAdapterError("the rollout pool backend serves text-only prompts (got images)")

        def generate(unique: list) -> tuple[list, ...]:
            if self.pool is None:
                raise TrainerAdapterError("the main process has no rollout pool: pass one to attach()")
            requests = group_requests(unique, num_generations, self.sampling, "trl")
            with profiler or nullcontext():
                return unpack(checked(self.pool.generate(requests)))

        prompt_ids, (completion_ids, logprobs, versions, spans) = share_groups(
            self.accelerator, [list(p) for p in prompts], num_generations, generate)
        self.last_versions, self.last_segments = versions, spans
        # TRL's shape: per token a list of top-k logprobs / token ids, the sampled token first.
        lps = [[[lp] for lp in seq] for seq in logprobs]
        lp_ids = [[[t] for t in seq] for seq in completion_ids]
        return prompt_ids, completion_ids, lps, lp_ids


def _check_trainer(trainer: Any) -> None:
    trl = require_trl()
    kinds = tuple(getattr(trl, name) for name in ("GRPOTrainer", "RLOOTrainer") if hasattr(trl, name))
    if not isinstance(trainer, kinds):
        raise TrainerAdapterError(f"attach() serves GRPOTrainer and RLOOTrainer, not {type(trainer).__name__}; "
                                  f"for AsyncGRPOTrainer pass rollout_plugin.trl.PoolRolloutWorker instead")
    if getattr(trainer, "vllm_generation", None) is not None:
        raise TrainerAdapterError("the trainer already built its own vLLM backend (args.use_vllm=True); "
                                  "create it with use_vllm=False and let attach() install the pool")


def attach(trainer: Any, pool: SyncRolloutPool | None, *, weights_dir: str | Path | None = None,
           weights: WeightsConfig | None = None, callback: RolloutPoolCallback | None = None) -> RolloutPoolCallback:
    """Make ``trainer`` generate with ``pool`` and sync weights to it after each optimizer step.

    ``pool`` is the started :class:`SyncRolloutPool` on the main process and None on the others
    (:func:`rollout_plugin.trl.make_pool` does that under ``accelerate launch``); call ``attach`` on every
    rank. Engines need ``engine.dev_mode=True``. ``weights``: the transport (``folder``, the default, or
    ``nccl``); ``weights_dir`` (or ``weights.dir``) must be readable by every engine (default:
    ``<output_dir>/rollout_weights``). Returns the installed callback (pool metrics)."""
    _check_trainer(trainer)

    def check() -> None:  # on every rank, so that a refusal anywhere stops every rank here
        check_one_pool(trainer.accelerator, pool)
        if pool is not None:
            warn_biased_logprobs(trainer, pool)

    everyone(trainer.accelerator, check)
    sync = weight_sync(trainer, pool, weights, weights_dir)
    backend = PoolGeneration(trainer, pool, sync)
    # The trainer's vLLM path (use_vllm) is what calls sync_weights/generate and applies the IS correction.
    trainer.use_vllm = True
    trainer.vllm_mode = "server"
    trainer.vllm_generation = backend
    trainer._last_loaded_step = -1  # first generation pushes the trainer's weights: engine and trainer agree
    cb = callback or RolloutPoolCallback(pool)
    cb.bind(trainer, sync)
    if cb not in trainer.callback_handler.callbacks:
        trainer.add_callback(cb)
    log.info("trl: %s generates with the rollout pool (%s, rank %d of %d)", type(trainer).__name__,
             "main process" if pool is not None else "worker rank", trainer.accelerator.process_index,
             trainer.accelerator.num_processes)
    return cb
