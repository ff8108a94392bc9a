"""`rollout-plugin collect` end to end: real engines, exactly-once output, clean shutdown, clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_fixtures import group_alive
from rollout_plugin.collect.dataset import load_examples

CLI = [sys.executable, "-m", "rollout_plugin.cli.main", "collect"]


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def engine_pids(stderr: str) -> list[int]:
    return [int(p) for p in re.findall(r"stopped -> starting \(pid=(\d+)", stderr)]


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling another process's state; there is no event to wait on


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_engines_k4_write_every_sample_exactly_once(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_cli("pool.engines=2", "pool.k=4", "sampling.max_tokens=24", f"output={out}",
                   f"engine.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {f"{ex.id}#{j}" for ex in load_examples(None) for j in range(4)}
    rows = rows_of(out)
    assert len(rows) == len(expected) == 800 and {r["id"] for r in rows} == expected
    assert all(isinstance(r["reward"], float) for r in rows)
    assert {r["engine"] for r in rows} == {"engine0", "engine1"}
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["samples"] == 800 and summary["failed_prompts"] == 0 and summary["reward_mean"] is not None
    assert [e["name"] for e in summary["engines"]] == ["engine0", "engine1"]
    assert all(e["share"] > 0.2 and e["mean_inflight"] > 0 for e in summary["engines"])
    assert "output tokens/s" in proc.stdout and "engine1: share" in proc.stdout
    pids = engine_pids(proc.stderr)
    assert len(pids) == 2 and not any(group_alive(p) for p in pids)


@pytest.mark.slow
def test_ctrl_c_stops_every_engine(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([*CLI, "sampling.max_tokens=1000", "engine.max_model_len=1100", f"output={out}",
                             f"engine.log_dir={tmp_path / 'logs'}"], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    stderr_lines: list[str] = []
    try:
        for line in proc.stderr:  # read until the pool is up and generating
            stderr_lines.append(line)
            if "pool ready" in line:
                break
        pids = engine_pids("".join(stderr_lines))
        assert pids, "".join(stderr_lines)[-2000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted; engines stopped" in rest
    assert not any(group_alive(p) for p in pids)


def test_resume_skips_done_ids_and_never_duplicates(live_engine, tmp_path):
    out = tmp_path / "out.jsonl"
    attach = [f"engine.urls=[{live_engine.url}]", f"engine.api_key={live_engine.api_key}",
              "engine.max_model_len=1024", "sampling.max_tokens=8", "pool.k=2", f"output={out}"]
    first = run_cli(*attach, "limit=10", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(out, "a") as f:
        f.write('{"id": "torn')  # a crash mid-line
    second = run_cli(*attach, "limit=25", "resume=true", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    ids = [r["id"] for r in rows_of(out)]
    assert len(ids) == len(set(ids)) == 50
    assert "25 prompts" not in second.stdout and "15 prompts" in second.stdout


@pytest.mark.parametrize("args,message", [
    (["input=missing.jsonl"], "input='missing.jsonl': no such file"),
    (["input=bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["pool.enginez=2"], "pool.enginez='2': unknown config key (try pool.engines=…)"),
    (["engine.model=/no/such/dir"], "engine.model='/no/such/dir': no such model directory"),
    (["output=exists.jsonl"], "output='exists.jsonl' exists; pass overwrite=true"),
    (["verify.verifier=nope.mod:fn"], "cannot import 'nope.mod'"),
    (["engine.gpu_memory_utilization=2", "pool.k=0"], "engine.gpu_memory_utilization=2.0: must be in (0.0, 1.0]"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    (tmp_path / "exists.jsonl").write_text("old\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.jsonl").read_text() == "old\n"


def test_engine_start_failure_reports_log_tail(tmp_path, model_dir):
    proc = run_cli(f"engine.model={model_dir}", "engine.extra_args=[--no-such-flag]", f"output={tmp_path / 'o.jsonl'}",
                   f"engine.log_dir={tmp_path / 'logs'}", "log_level=ERROR", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "engine0 exited with code" in line and "log tail:" in line and "--no-such-flag" in line
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_engine_dies_with_a_killed_owner(tmp_path, model_dir):
    """SIGKILL leaves no chance to clean up: PR_SET_PDEATHSIG must take the engine down."""
    script = (
        "import sys\n"
        "from rollout_plugin import EngineConfig, PoolConfig, SyncRolloutPool\n"
        f"cfg = EngineConfig(model={model_dir!r}, max_model_len=512, cpu_kvcache_gb=1, log_dir={str(tmp_path)!r})\n"
        "with SyncRolloutPool(cfg, PoolConfig(per_engine=8)) as pool:\n"
        "    print('READY', pool.endpoints[0].pid, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line.startswith("READY"), line
        pgid = int(line.split()[1])
        assert group_alive(pgid)
    finally:
        owner.kill()
        owner.wait()
    wait_until(lambda: not group_alive(pgid), 60, "the orphaned engine to exit")
