#!/usr/bin/env bash
# bash recipes/collect_grpo.sh [key=value ...]   (e.g. engine.model=/models/qwen2.5-1.5b input=train.jsonl)
# GRPO-shaped collection: 8 samples per prompt sent as one n=8 request, two engines each on its own
# cores, long enough answers for reasoning, rewards from the last number in the completion.
set -euo pipefail
exec rollout-plugin collect \
  pool.engines=2 \
  pool.k=8 \
  sampling.temperature=1.0 \
  sampling.max_tokens=256 \
  output=grpo_rollouts.jsonl \
  "$@"
