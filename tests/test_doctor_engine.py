"""`rollout-plugin doctor` on short real runs made deliberately wrong: a cap of 1, a KV-starved engine, a slow
verifier. Each run is a few dozen requests against a real vLLM CPU engine; the doctor must name its problem."""

from __future__ import annotations

import asyncio
import json

import pytest

from rollout_plugin.cli.main import main
from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def attach(url: str, live_engine) -> list[str]:
    return [f"engine.urls=[{url}]", f"engine.api_key={live_engine.api_key}",
            f"engine.served_model_name={live_engine.model_dir}", "engine.max_model_len=1024", "progress=off"]


def doctor(out, capsys) -> str:
    capsys.readouterr()
    assert main(["doctor", f"run={out}"]) == 0
    return capsys.readouterr().out


def test_cap_one_is_found_underfed(live_engine, tmp_path, capsys):
    out = tmp_path / "cap1.jsonl"
    assert main(["collect", *attach(live_engine.url, live_engine), f"output={out}", "limit=24",
                 "pool.per_engine=1", "controller=off", "sampling.max_tokens=48", "sampling.ignore_eos=true",
                 "controller.interval_s=0.25"]) == 0
    report = doctor(out, capsys)
    # pool.max_concurrent is left derived, so the global cap follows the engines' caps: the per-engine cap binds.
    assert "- underfed-cap [engine0]:" in report and "try: pool.per_engine=" in report, report


def test_live_metrics_of_an_idle_engine(live_engine, capsys):
    assert main(["doctor", f"urls=[{live_engine.url}]", f"api_key={live_engine.api_key}"]) == 0
    out = capsys.readouterr().out
    assert "doctor: live /metrics of 1 engine(s)" in out and "nothing to change right now" in out


def test_kv_starved_engine_is_found_under_kv_pressure(live_engine, tmp_path, capsys):
    # 64 blocks x 16 = 1024 tokens of KV for 32 sequences of up to ~200 tokens: preemptions.
    cfg = EngineConfig(model=live_engine.model_dir, api_key=live_engine.api_key, max_model_len=1024,
                       cpu_kvcache_gb=1, extra_args=["--num-gpu-blocks-override", "64"], log_dir=str(tmp_path),
                       startup_timeout_s=900)
    (port,) = reserve_ports(cfg.host, 0, 1)
    starved = EngineProcess(1, cfg, model=live_engine.model_dir, port=port, max_num_seqs=64, cpu_bind=None,
                            log_dir=tmp_path)
    starved.start()
    try:
        asyncio.run(starved.wait_ready())
        out = tmp_path / "starved.jsonl"
        assert main(["collect", *attach(starved.url, live_engine), f"output={out}", "limit=32", "pool.k=2",
                     "pool.per_engine=64", "controller=off", "sampling.max_tokens=160", "sampling.ignore_eos=true",
                     "controller.interval_s=0.25"]) == 0
    finally:
        starved.stop()
    report = doctor(out, capsys)
    assert "- kv-pressure [engine0]:" in report and "try: pool.per_engine=" in report, report


def test_slow_verifier_is_found_and_generation_finishes_first(live_engine, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLOW_VERIFIER_S", "0.2")
    out = tmp_path / "slowverify.jsonl"
    assert main(["collect", *attach(live_engine.url, live_engine), f"output={out}", "limit=16", "pool.k=2",
                 "sampling.max_tokens=16", "verify.verifier=verifiers_for_tests:slow_length",
                 "verify.workers=1"]) == 0
    summary = json.loads(out.with_name("slowverify.summary.json").read_text())
    # 32 samples x 0.2 s on one worker: generation is done long before the last reward.
    assert summary["verify_wait_s"] > 0 and summary["bound_by"] == "verification"
    assert summary["verify_busy_s"] >= 32 * 0.2 * 0.9
    report = doctor(out, capsys)
    assert "- verify-bound:" in report and "verify=deferred" in report, report
