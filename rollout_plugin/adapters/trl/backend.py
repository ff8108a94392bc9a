"""The pool as ``GRPOTrainer``'s (and ``RLOOTrainer``'s) generation backend.

TRL 1.16 generates through ``trainer.vllm_generation``: ``sync_weights()`` when the step changed,
then ``generate(prompts=token ids, images, num_generations)`` returning per-completion token ids
and per-token logprobs. :class:`PoolGeneration` keeps that contract, so TRL's chat templating, tool
loop and importance-sampling correction stay as they are; only where the tokens come from changes.
Like TRL's server mode it gathers every rank's prompts to rank 0, sends each distinct prompt once
as a group of ``num_generations`` (one ``n=k`` request), and hands each rank back its slice
(:func:`.ranks.share_groups`); weights are gathered on every rank and published from rank 0
(:class:`.weights.WeightSync`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.trl.compat import require_trl
from rollout_plugin.adapters.trl.versions import Span, completion_spans, oldest_version
from rollout_plugin.adapters.trl.weights import WeightSync
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.types import Request, Result, SamplingParams

if TYPE_CHECKING:
    from rollout_plugin.adapters.trl.callback import RolloutPoolCallback
    from rollout_plugin.adapters.trl.config import WeightsConfig
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


LOGPROBS_FIX = ("the pool asks for them (`logprobs` in every request); serve TRL from vLLM engines started with "
                "`--logprobs-mode processed_logprobs` (engine.extra_args=[--logprobs-mode,processed_logprobs]), "
                "whose logprobs are the sampled tokens' after temperature, top-p and top-k")


def sample_logprobs(result: Result, j: int) -> list[float]:
    """Sample ``j``'s logprob per sampled token; a hole would feed TRL's importance-sampling correction
    made-up numbers, so a missing one fails the step, naming the engine and the fix."""
    s = result.samples[j]
    n = len(s.token_ids or ())
    if s.logprobs is None or len(s.logprobs) != n or any(math.isnan(x) for x in s.logprobs):
        got = ("none" if s.logprobs is None else f"{len(s.logprobs)} for {n} tokens" if len(s.logprobs) != n
               else "a token without one")
        raise TrainerAdapterError(f"{result.engine or 'an engine'}: no logprob per sampled token for {result.id} "
                                  f"sample {j} (got {got}); {LOGPROBS_FIX}")
    return list(s.logprobs)


def unpack(results: Sequence[Result]) -> tuple[list[list[int]], list[list[float]], list[int], list[list[Span]]]:
    """Per completion, in group order: token ids, sampled-token logprobs (every one present), the oldest weight
    version of its tokens, and its spans ``(version, start, end)`` (:mod:`.versions`: more than one when the
    sample crossed a weight update)."""
    completion_ids, logprobs, versions, spans = [], [], [], []
    for r in results:
        for j, s in enumerate(r.samples):
            completion_ids.append(list(s.token_ids or ()))
            logprobs.append(sample_logprobs(r, j))
            versions.append(oldest_version(s, r.weight_version))
            spans.append(completion_spans(s, r.weight_version))
    return completion_ids, logprobs, versions, spans


def logprobs_mode_warnings(server_info: dict[str, Any]) -> list[str]:
    """TRL's own warning (GRPOTrainer, server mode), one per engine whose logprobs are taken before temperature,
    top-p and top-k: ``server_info`` maps engine name -> its ``GET /server_info?config_format=json``."""
    out = []
    for name, info in server_info.items():
        mode = (((info or {}).get("vllm_config") or {}).get("model_config") or {}).get("logprobs_mode")
        if mode != "processed_logprobs":
            out.append(f"{name}: The vLLM server runs with `--logprobs-mode {mode}`, which biases the importance "
                       "sampling correction. Restart it with `--logprobs-mode processed_logprobs`, or set "
                       "`vllm_importance_sampling_correction=False`. (engine.extra_args=[--logprobs-mode,"
                       "processed_logprobs])")
    return out


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
        from rollout_plugin.adapters.trl.ranks import share_groups

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


def check_one_pool(accelerator: Any, pool: SyncRolloutPool | None) -> None:
    """One pool per job: on the main process, never on the other ranks (each would start its own engines)."""
    if pool is not None and not accelerator.is_main_process:
        raise TrainerAdapterError(
            f"a rollout pool on rank {accelerator.process_index} of {accelerator.num_processes}: every rank "
            "started its own engines. Build it with `with rollout_plugin.trl.make_pool(engine, pool_config) as "
            "pool:`, which starts one pool on the main process and gives the other ranks None")


def warn_biased_logprobs(trainer: Any, pool: SyncRolloutPool) -> list[str]:
    """TRL's warning when an engine's logprobs would bias the importance-sampling correction (main process)."""
    from rollout_plugin.adapters.trl.engines import engine_get

    if not getattr(trainer.args, "vllm_importance_sampling_correction", False):
        return []  # RLOO, or the correction is off: nothing to bias
    warnings = logprobs_mode_warnings(engine_get(pool, "/server_info?config_format=json"))
    for line in warnings:
        log.warning(line)
    return warnings


def attach(trainer: Any, pool: SyncRolloutPool | None, *, weights_dir: str | Path | None = None,
           weights: WeightsConfig | None = None, callback: RolloutPoolCallback | None = None) -> RolloutPoolCallback:
    """Make ``trainer`` generate with ``pool`` and sync weights to it after each optimizer step.

    ``pool`` is the started :class:`SyncRolloutPool` on the main process and None on the others
    (:func:`rollout_plugin.trl.make_pool` does that under ``accelerate launch``); call ``attach`` on every
    rank. Engines need ``engine.dev_mode=True``. ``weights``: the transport (``folder``, the default, or
    ``nccl``); ``weights_dir`` (or ``weights.dir``) must be readable by every engine (default:
    ``<output_dir>/rollout_weights``). Returns the installed callback (pool metrics)."""
    from rollout_plugin.adapters.trl.callback import RolloutPoolCallback, weight_sync

    from rollout_plugin.adapters.trl.ranks import everyone

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
