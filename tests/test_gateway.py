"""`rollout-plugin serve` for real: two launched CPU engines behind one OpenAI endpoint, used by httpx and by
TRL's own VLLMClient (run in the trainer venv, which has TRL but no vLLM)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout_plugin.errors import ConfigError
from rollout_plugin.gateway.server import ServeConfig, validate_serve

ROOT = Path(__file__).resolve().parents[1]
TRAINER_PYTHON = ROOT / ".venv-trainers" / "bin" / "python"
TRL_PYTHON = (sys.executable if importlib.util.find_spec("trl") is not None
              else TRAINER_PYTHON if TRAINER_PYTHON.exists() else None)

# TRL's VLLMClient refuses to start without vLLM installed. Where TRL and vLLM share a venv (the main one)
# it runs as it ships; in the trainer venv (TRL, no vLLM) that one check is lifted: generation never
# touches vLLM, only the NCCL weight sync does.
TRL_SCRIPT = """
import json, sys
import trl.generation.vllm_client as m
if not m.is_vllm_available():
    m.is_vllm_available = lambda *a, **k: True
client = m.VLLMClient(base_url=sys.argv[1], connection_timeout=60)
out = client.generate([f"Question {i}: what is {i}+{i}?" for i in range(8)], n=2, max_tokens=8, temperature=1.0)
print(json.dumps({"model": client.model, "world_size": client.get_world_size(),
                  "prompts": len(out["prompt_ids"]), "completions": [len(c) for c in out["completion_ids"]],
                  "logprobs": [len(lp) for lp in out["logprobs"]]}))
"""


def test_non_loopback_needs_an_api_key():
    with pytest.raises(ConfigError, match=r"api_key=None: required when host='0.0.0.0'"):
        validate_serve(ServeConfig(host="0.0.0.0"))
    validate_serve(ServeConfig(host="0.0.0.0", api_key="s3cret"))
    validate_serve(ServeConfig())


def wait_for(condition, timeout_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(poll_s)  # polling a condition with a deadline


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    tmp = tmp_path_factory.mktemp("gateway")
    ready = tmp / "url"
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout_plugin.cli.main", "serve", "pool.engines=2", "port=0", f"ready_file={ready}",
         "engine.max_model_len=512", "engine.cpu_kvcache_gb=1", "engine.dev_mode=true", f"engine.log_dir={tmp}",
         "engine.startup_timeout_s=900"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout_s=1000)
        assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
        yield ready.read_text().strip(), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def ok_results(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'rollout_pool_results_total\{engine="(\w+)",outcome="ok"\} ([\d.]+)', text)}




@pytest.mark.engine
@pytest.mark.slow
def test_openai_routes_through_the_pool(gateway):
    url, _ = gateway
    with httpx.Client(base_url=url, timeout=300) as http:
        health = http.get("/health").json()
        assert health["healthy"] == ["engine0", "engine1"]
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": [f"Say {i}" for i in range(6)], "n": 2, "max_tokens": 6,
                "return_token_ids": True}
        data = http.post("/v1/completions", json=body).json()
        assert [c["index"] for c in data["choices"]] == list(range(12))
        assert all(len(c["token_ids"]) <= 6 for c in data["choices"]) and data["usage"]["completion_tokens"] > 0
        chat = http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).json()
        assert len(chat["choices"]) == 1 and chat["choices"][0]["message"]["role"] == "assistant"
        streamed = http.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        bad = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 100000})
        assert bad.status_code == 400 and "max" in bad.json()["error"]["message"]
        nccl = http.post("/init_weight_transfer_engine", json={})
        assert nccl.status_code == 501 and "engine.urls" in nccl.json()["error"]["message"]
        assert http.post("/admin/pause").json()["paused"] is True
        assert http.post("/admin/resume", json={"weight_version": 7}).json() == {"paused": False,
                                                                                 "weight_version": 7}
        reset = http.post("/reset_prefix_cache").json()
        assert reset["success"] and set(reset["engines"]) == {"engine0", "engine1"}
    assert set(ok_results(url)) == {"engine0", "engine1"}  # the split batch went to both engines


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.skipif(TRL_PYTHON is None, reason="TRL is in neither venv (pip install trl, or scripts/trainer_venv.sh)")
def test_trl_vllm_client_gets_completions_from_both_engines(gateway):
    url, _ = gateway
    before = ok_results(url)
    out = subprocess.run([str(TRL_PYTHON), "-c", TRL_SCRIPT, url], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["prompts"] == 8 and len(got["completions"]) == 16 and all(0 < n <= 8 for n in got["completions"])
    assert got["logprobs"] == got["completions"] and got["world_size"] == 2
    after = ok_results(url)
    assert all(after[e] > before.get(e, 0) for e in ("engine0", "engine1"))


@pytest.mark.engine
@pytest.mark.slow
def test_sigterm_stops_the_gateway_and_its_engines(gateway):
    url, proc = gateway
    engines = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat") if _parent(p.parent) == proc.pid]
    assert len(engines) >= 2  # the two vLLM servers it launched
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) in (0, 143, -signal.SIGTERM)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)
    assert not [pid for pid in engines if _alive(Path(f"/proc/{pid}"))]


def _parent(proc_dir: Path) -> int | None:
    try:
        return int(proc_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(proc_dir: Path) -> bool:
    try:
        return proc_dir.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
