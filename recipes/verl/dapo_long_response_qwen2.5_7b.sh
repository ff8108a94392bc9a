#!/usr/bin/env bash
# DAPO-style long responses (16K), Qwen2.5-7B-Instruct, 2 nodes × 8 × 80 GB GPUs, colocated rollout.
# Needs: pip install 'rollout-plugin[verl]' vllm; a math set as parquet (e.g. DAPO-Math-17k) on every node.
# Run:        bash recipes/verl/dapo_long_response_qwen2.5_7b.sh [more verl overrides]
# Check first: LAUNCH="rollout-plugin verl-check" bash recipes/verl/dapo_long_response_qwen2.5_7b.sh
# +rollout_pool=long_context: Ulysses SP ≥ 2, dynamic batch sizes, a smaller per-engine cap and a router
# that keeps groups together harder. DAPO's clip-higher and token-level loss are verl keys, set below.
set -euo pipefail
DATA="${DATA:-$HOME/data/dapo}"
OVERRIDES=(
    +rollout_pool=long_context
    rollout_pool.hardware="${HARDWARE:-h100-80}"
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=false
    data.train_files="$DATA/train.parquet"
    data.val_files="$DATA/test.parquet"
    data.train_batch_size=128
    data.max_prompt_length=2048
    data.max_response_length=16384
    data.filter_overlong_prompts=true
    actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=32
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.clip_ratio_low=0.2
    actor_rollout_ref.actor.clip_ratio_high=0.28
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.rollout.n=16
    trainer.n_gpus_per_node=8
    trainer.nnodes=2
    trainer.total_epochs=10
    trainer.project_name=rollout_pool_dapo
    trainer.experiment_name=qwen2.5-7b-dapo-16k
    trainer.logger='["console"]'
)
${LAUNCH:-python -m verl.trainer.main_ppo} "${OVERRIDES[@]}" "$@"
