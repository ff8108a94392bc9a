"""The pool as ``GRPOTrainer``'s (and ``RLOOTrainer``'s) generation backend.

TRL 1.16 generates through ``trainer.vllm_generation``: ``sync_weights()`` when the step changed,
then ``generate(prompts=token ids, images, num_generations)`` returning per-completion token ids
and per-token logprobs. :class:`PoolGeneration` keeps that contract, so TRL's chat templating, tool
loop and importance-sampling correction stay as they are; only where the tokens come from changes.
Like TRL's server mode it gathers every rank's prompts to rank 0, sends each distinct prompt once
as a group of ``num_generations`` (one ``n=k`` request), and hands each rank back its slice.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.trl.compat import require_trl
from rollout_plugin.adapters.trl.weights import WeightSync
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.types import Request, Result, SamplingParams

if TYPE_CHECKING:
    from rollout_plugin.adapters.trl.callback import RolloutPoolCallback
    from rollout_plugin.pool.pool import SyncRolloutPool

log = logging.getLogger(__name__)

_ids = itertools.count()


def trainer_sampling(trainer: Any) -> SamplingParams:
    """The trainer's generation settings as pool sampling params; settings the pool can't honour are refused."""
    args = trainer.args
    problems = []
    if getattr(args, "repetition_penalty", 1.0) not in (None, 1.0):
        problems.append(f"repetition_penalty={args.repetition_penalty!r} (use 1.0)")
    if getattr(args, "min_p", None) not in (None, 0.0):
        problems.append(f"min_p={args.min_p!r} (use None)")
    if getattr(args, "generation_kwargs", None):
        problems.append(f"generation_kwargs={args.generation_kwargs!r} (use None)")
    if getattr(args, "vllm_structured_outputs_regex", None):
        problems.append("vllm_structured_outputs_regex (use None)")
    if problems:
        raise TrainerAdapterError("the rollout pool does not apply these trainer settings: " + "; ".join(problems))
    top_k = getattr(args, "top_k", 0)
    return SamplingParams(
        max_tokens=int(args.max_completion_length),
        temperature=float(args.temperature),
        top_p=float(getattr(args, "top_p", 1.0)),
        top_k=-1 if not top_k or top_k < 0 else int(top_k),
        logprobs=True,  # the importance-sampling correction needs the sampled tokens' logprobs
    )


def group_requests(prompts: Sequence[Any], n: int, sampling: SamplingParams, tag: str) -> list[Request]:
    """One request per distinct prompt (token ids, text or messages), ``n`` samples each."""
    batch = next(_ids)
    return [Request(id=f"{tag}-{batch}-{i}", prompt=list(p) if not isinstance(p, str) else p, n=n,
                    sampling=sampling) for i, p in enumerate(prompts)]


def checked(results: Sequence[Result]) -> Sequence[Result]:
    """A training batch cannot have holes: a failed request (after the pool's retries) fails the step."""
    failed = [r for r in results if not r.ok]
    if failed:
        raise TrainerAdapterError(f"{len(failed)} of {len(results)} rollout requests failed; first: "
                                  f"{failed[0].id}: {failed[0].error}")
    for r in results:
        if any(s.token_ids is None for s in r.samples):
            raise TrainerAdapterError(f"{r.id}: the engine returned no token ids (needs vLLM's return_token_ids)")
    return results


def unpack(results: Sequence[Result]) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """Per completion, in group order: token ids, sampled-token logprobs, and the weight version."""
    completion_ids, logprobs, versions = [], [], []
    for r in results:
        for s in r.samples:
            completion_ids.append(list(s.token_ids or ()))
            lps = list(s.logprobs) if s.logprobs is not None else [0.0] * len(completion_ids[-1])
            logprobs.append(lps)
            versions.append(r.weight_version)
    return completion_ids, logprobs, versions


class PoolGeneration:
    """Stands in for TRL's ``VLLMGeneration``: same ``sync_weights`` / ``generate`` contract, served by the pool.

    ``pool`` and ``weights`` live on the main process only (None elsewhere); every rank calls both methods,
    as TRL's collectives require."""

    def __init__(self, trainer: Any, pool: SyncRolloutPool | None, weights: WeightSync | None):
        self.trainer = trainer
        self.pool = pool
        self.weights = weights
        self.accelerator = trainer.accelerator
        self.sampling = trainer_sampling(trainer)
        self.last_versions: list[int] = []

    def sync_weights(self) -> None:
        if self.accelerator.is_main_process and self.weights is not None:
            self.weights.sync(self.accelerator.unwrap_model(self.trainer.model), self.trainer.state.global_step)
        self.accelerator.wait_for_everyone()

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int,
                 profiler: Any = None) -> tuple[list, list, list, list]:
        from accelerate.utils import broadcast_object_list, gather_object

        if images is not None and any(img is not None for img in images):
            raise TrainerAdapterError("the rollout pool backend serves text-only prompts (got images)")
        all_prompts = gather_object(prompts)
        payload = None
        if self.accelerator.is_main_process:
            if self.pool is None:
                raise TrainerAdapterError("the main process has no rollout pool: pass one to attach()")
            # The trainer repeats each prompt num_generations times in a row: one group per distinct prompt.
            unique = all_prompts[::num_generations]
            with profiler or nullcontext():
                results = checked(self.pool.generate(group_requests(unique, num_generations, self.sampling, "trl")))
            completion_ids, logprobs, versions = unpack(results)
            payload = ([list(p) for p in unique], completion_ids, logprobs, versions)
        payload = broadcast_object_list([payload], from_process=0)[0]
        unique_ids, completion_ids, logprobs, versions = payload
        prompt_ids = [ids for ids in unique_ids for _ in range(num_generations)]
        mine = slice(self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts))
        self.last_versions = versions[mine]
        # TRL's shape: per token a list of top-k logprobs / token ids, the sampled token first.
        lps = [[[lp] for lp in seq] for seq in logprobs[mine]]
        lp_ids = [[[t] for t in seq] for seq in completion_ids[mine]]
        return prompt_ids[mine], completion_ids[mine], lps, lp_ids


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
           callback: RolloutPoolCallback | None = None) -> RolloutPoolCallback:
    """Make ``trainer`` generate with ``pool`` and sync weights to it after each optimizer step.

    ``pool`` is the started :class:`SyncRolloutPool` on the main process and None on the others; its
    engines need ``engine.dev_mode=True`` (weight reload). ``weights_dir`` must be readable by every
    engine (default: ``<output_dir>/rollout_weights``). Returns the installed callback (pool metrics)."""
    from rollout_plugin.adapters.trl.callback import RolloutPoolCallback

    _check_trainer(trainer)
    folder = Path(weights_dir) if weights_dir is not None else Path(trainer.args.output_dir) / "rollout_weights"
    weights = WeightSync(pool, folder) if pool is not None else None
    backend = PoolGeneration(trainer, pool, weights)
    # The trainer's vLLM path (use_vllm) is what calls sync_weights/generate and applies the IS correction.
    trainer.use_vllm = True
    trainer.vllm_mode = "server"
    trainer.vllm_generation = backend
    trainer._last_loaded_step = -1  # first generation pushes the trainer's weights: engine and trainer agree
    cb = callback or RolloutPoolCallback(pool)
    cb.bind(trainer, weights)
    if cb not in trainer.callback_handler.callbacks:
        trainer.add_callback(cb)
    log.info("trl: %s generates with the rollout pool (%s)", type(trainer).__name__,
             "main process" if pool is not None else "worker rank")
    return cb
