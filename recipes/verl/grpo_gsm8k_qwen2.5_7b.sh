#!/usr/bin/env bash
# GRPO on GSM8K, Qwen2.5-7B-Instruct, 1 node × 8 × 80 GB GPUs (H100/A100-80), colocated rollout.
# Needs: pip install 'rollout-plugin[verl]' vllm; GSM8K as parquet (verl: python examples/data_preprocess/gsm8k.py).
# Run:        bash recipes/verl/grpo_gsm8k_qwen2.5_7b.sh [more verl overrides]
# Check first: LAUNCH="rollout-plugin verl-check" bash recipes/verl/grpo_gsm8k_qwen2.5_7b.sh
# +rollout_pool=pool derives micro-batches, token budgets, TP, memory utilization, max_num_seqs and the
# router's caps from the batch sizes and lengths below (override any key to pin it).
set -euo pipefail
DATA="${DATA:-$HOME/data/gsm8k}"
OVERRIDES=(
    +rollout_pool=pool
    rollout_pool.hardware="${HARDWARE:-h100-80}"
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=false
    data.train_files="$DATA/train.parquet"
    data.val_files="$DATA/test.parquet"
    data.train_batch_size=512
    data.max_prompt_length=512
    data.max_response_length=1024
    data.filter_overlong_prompts=true
    actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=128
    actor_rollout_ref.actor.use_kl_loss=true
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.rollout.n=8
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.total_epochs=15
    trainer.project_name=rollout_pool_gsm8k
    trainer.experiment_name=qwen2.5-7b-grpo
    trainer.logger='["console"]'
)
${LAUNCH:-python -m verl.trainer.main_ppo} "${OVERRIDES[@]}" "$@"
