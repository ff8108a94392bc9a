"""One real vLLM CPU engine per test session, shared by every integration test.

It is launched with the same code users run (EngineProcess) and stopped when the session ends,
pass or fail.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports


@dataclass(frozen=True)
class LiveEngine:
    url: str
    api_key: str
    model_dir: str
    pid: int
    config: EngineConfig


@pytest.fixture(scope="session")
def model_dir() -> str:
    from rollout_plugin.model.embedded import resolve_model

    return resolve_model("embedded:tiny-llama")


@pytest.fixture(scope="session")
def live_engine(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveEngine]:
    cfg = EngineConfig(model=model_dir, max_model_len=1024, cpu_kvcache_gb=1, dev_mode=True,
                       log_dir=str(tmp_path_factory.mktemp("engine-logs")))
    (port,) = reserve_ports(cfg.host, 0, 1)
    proc = EngineProcess(0, cfg, model=model_dir, port=port, max_num_seqs=256, cpu_bind=None,
                         log_dir=Path(cfg.log_dir))
    proc.start()
    try:
        asyncio.run(proc.wait_ready())
        yield LiveEngine(proc.url, proc.api_key, model_dir, proc.proc.pid, cfg)
    finally:
        proc.stop()


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process in the process group (an engine leads its own group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


async def engine_counter(live_engine, pattern: str) -> float:
    """The sum of the engine's /metrics samples whose line matches ``pattern``."""
    root = live_engine.url.rstrip("/").removesuffix("/v1")
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(f"{root}/metrics", headers={"Authorization": f"Bearer {live_engine.api_key}"})).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{pattern}.* ([\d.e+]+)$", text, re.M))


async def start_when_idle(live_engine, pool, requests, samples: int) -> tuple[asyncio.Future, float]:
    """Submit ``requests`` once the shared engine is idle (its counters are shared with other tests); returns the
    task and the engine's generated-token count before it, once the pool has all ``samples`` in flight."""
    async with asyncio.timeout(120):
        while await engine_counter(live_engine, "vllm:num_requests_(?:running|waiting)") > 0:
            await asyncio.sleep(0.05)  # polling the engine's gauges with a deadline
    before = await engine_counter(live_engine, "vllm:generation_tokens_total")
    task = asyncio.ensure_future(pool.generate(requests))
    # Not on the engine's token count: a 2-core machine's vLLM answers /metrics seconds late while it generates
    # (up to 3.7 s measured), by which time every sample may have finished.
    async with asyncio.timeout(120):
        while pool.stats().samples_inflight < samples:
            assert not task.done(), "the samples finished before they were all in flight"
            await asyncio.sleep(0.005)  # polling the pool's own count (no I/O) with a deadline
    return task, before
