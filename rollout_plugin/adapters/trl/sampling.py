"""The trainer's generation settings in the pool's terms, and whether the engines' logprobs fit its training.

Shared by every TRL route (the backend, ``rollout_func``): TRL's ``args`` become the pool's
:class:`~rollout_plugin.types.SamplingParams`, a setting the pool cannot honour is refused, and an engine
whose logprobs would bias TRL's importance-sampling correction is warned about as TRL itself warns.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.trl.engines import engine_get
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.types import SamplingParams

if TYPE_CHECKING:
    from rollout_plugin.pool import SyncRolloutPool

__all__ = ["logprobs_mode_warnings", "trainer_sampling", "warn_biased_logprobs"]

log = logging.getLogger(__name__)


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


def warn_biased_logprobs(trainer: Any, pool: SyncRolloutPool) -> list[str]:
    """TRL's warning when an engine's logprobs would bias the importance-sampling correction (main process)."""
    if not getattr(trainer.args, "vllm_importance_sampling_correction", False):
        return []  # RLOO, or the correction is off: nothing to bias
    warnings = logprobs_mode_warnings(engine_get(pool, "/server_info?config_format=json"))
    for line in warnings:
        log.warning(line)
    return warnings
