"""The pool behind TRL's public ``rollout_func(prompts, trainer) -> dict`` hook.

Trade-off against :func:`attach` (the generation backend): ``rollout_func`` is TRL's public, if
experimental, hook and needs no trainer internals, but TRL then treats generation as opaque. With
``use_vllm=False`` it drops the importance-sampling correction (the logprobs we return are used for
logging only) and its tool loop runs on our completions without re-generation through us. The
backend keeps both, at the price of standing in for a TRL-internal object (version-pinned).

Each rank calls the function with its own prompts (each repeated ``num_generations`` times in a
row). Prompts are rendered with the trainer's tokenizer and chat template here, then gathered to
the main process, sent once per group, and the slices handed back.

No step quota with carry-over here (the pool's :mod:`~rollout_plugin.pool.api.steps`): TRL pairs the
completions it gets back with the step's own dataset rows, and hands reward functions (and reward
models) those rows' ``prompts`` — a key ``rollout_func`` cannot override — so a group carried over
from an earlier step would be scored against another prompt. Use the async route
(:class:`~.async_worker.PoolRolloutWorker`), which scores each group with its own row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollout_plugin.adapters.common.ranks import share_groups
from rollout_plugin.adapters.common.translate import checked, group_requests, render_prompts, unpack
from rollout_plugin.adapters.trl.sampling import trainer_sampling
from rollout_plugin.errors import TrainerAdapterError

if TYPE_CHECKING:
    from rollout_plugin.adapters.trl.callback import RolloutPoolCallback


def make_rollout_func(callback: RolloutPoolCallback):
    """A ``rollout_func`` for ``GRPOTrainer(..., rollout_func=...)`` that generates with ``callback``'s pool.

    Extra keys in its output reach the reward functions, per completion: ``weight_version`` (the oldest weights
    of its tokens) and ``weight_segments`` (``[(version, start, end), ...]``: which weights made which output
    tokens, several spans when it crossed a weight update; :mod:`rollout_plugin.adapters.common.versions`)."""

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        if callback.trainer is not trainer:
            callback.bind(trainer)
        k = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if callback.weights is not None:  # every rank; a no-op when on_step_end already published this step
            callback.weights.sync(trainer.model, trainer.state.global_step)
        sampling = trainer_sampling(trainer)

        def generate(unique: list) -> tuple[list, ...]:
            pool = callback.pool
            if pool is None:
                raise TrainerAdapterError("the main process has no rollout pool: give the callback a pool or "
                                          "engine/pool_config")
            return unpack(checked(pool.generate(group_requests(unique, k, sampling, "trl-rf"))))

        ids = render_prompts(trainer.processing_class, prompts, getattr(trainer.args, "chat_template_kwargs", None))
        prompt_ids, (completion_ids, logprobs, versions, spans) = share_groups(trainer.accelerator, ids, k, generate)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs,
                "weight_version": versions, "weight_segments": spans}

    return rollout_func
