"""Deferred verification: `rollout-plugin verify` scores a rollout file, resumes after SIGKILL with no
sample lost or doubled; `collect verify=deferred` writes what it needs (real engine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollout_plugin.cli.main import main

TESTS = str(Path(__file__).parent)


def write_unverified(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}#0", "prompt_id": f"p{i}", "completion": f"the answer is {i % 5}",
                                "reward": None, "verified": False, "example": {"answer": 3, "id": f"p{i}"},
                                "prompt": f"q{i}"}) + "\n")


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def wait_for(condition, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(poll_s)  # polling a condition with a deadline, not a synchronisation sleep


def verify_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rollout_plugin.cli.main", "verify", *args]


def test_verify_scores_every_row_once(tmp_path, capsys):
    src, dst = tmp_path / "u.jsonl", tmp_path / "v.jsonl"
    write_unverified(src, 40)
    assert main(["verify", f"input={src}", f"output={dst}", "parallelism=8"]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}#0" for i in range(40))
    assert all(r["verified"] and r["reward"] == float(i % 5 == 3) for r in rows
               for i in [int(r["prompt_id"][1:])])
    assert "40 of 40 rows scored" in capsys.readouterr().out
    assert main(["verify", f"input={src}", f"output={dst}"]) == 2  # exists: neither resume nor overwrite


def test_verify_resumes_after_sigkill_without_loss_or_duplicates(tmp_path):
    src, dst = tmp_path / "u.jsonl", tmp_path / "v.jsonl"
    write_unverified(src, 60)
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SLOW_VERIFIER_S": "0.2"}
    slow = "verify.verifier=verifiers_for_tests:slow_length"
    proc = subprocess.Popen(verify_cmd(f"input={src}", f"output={dst}", "parallelism=4", slow), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Kill once some rows are written: none of the run's own shutdown code runs.
        wait_for(lambda: proc.poll() is not None or (dst.exists() and len(dst.read_text().splitlines()) >= 8))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done_before = ids(dst)
    assert 8 <= len(done_before) < 60
    with open(dst, "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # what a kill mid-write leaves
    out = subprocess.run(verify_cmd(f"input={src}", f"output={dst}", "parallelism=16", "resume=true", slow),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    after = ids(dst)
    assert sorted(after) == sorted(f"p{i}#0" for i in range(60))  # none lost, none doubled
    assert after[: len(done_before)] == done_before  # what was done stays as it was
    assert f"{len(done_before)} already done" in out.stdout


@pytest.mark.engine
def test_collect_deferred_then_verify(live_engine, tmp_path, capsys):
    out, verified = tmp_path / "r.jsonl", tmp_path / "r.verified.jsonl"
    attach = [f"engine.urls=[{live_engine.url}]", f"engine.api_key={live_engine.api_key}",
              f"engine.served_model_name={live_engine.model_dir}", "engine.max_model_len=1024"]
    assert main(["collect", *attach, f"output={out}", "limit=6", "pool.k=2", "sampling.max_tokens=8",
                 "verify=deferred", "progress=off"]) == 0
    assert "verification deferred" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["reward"] is None and r["verified"] is False for r in rows)
    assert all("answer" in r["example"] and r["prompt"] for r in rows)
    assert main(["verify", f"input={out}", "parallelism=4"]) == 0
    scored = [json.loads(line) for line in verified.read_text().splitlines()]
    assert sorted(r["id"] for r in scored) == sorted(r["id"] for r in rows)
    assert all(r["verified"] and r["reward"] in (0.0, 1.0) for r in scored)
