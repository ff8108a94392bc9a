"""What the doctor reads: a run's summary and timeline files, and (given URLs) live engine /metrics.

File and network I/O only; the analysis is :mod:`rollout_plugin.doctor.findings`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from rollout_plugin.collect.output import summary_path, timeline_path
from rollout_plugin.errors import InputError


def run_files(run: str | None, summary: str | None, timeline: str | None) -> tuple[Path, Path | None]:
    """``run=<collect output>`` names both files; ``summary=``/``timeline=`` name them one by one."""
    if run:
        out = Path(run).expanduser()
        s, t = Path(summary).expanduser() if summary else summary_path(out), (
            Path(timeline).expanduser() if timeline else timeline_path(out))
    elif summary:
        s, t = Path(summary).expanduser(), Path(timeline).expanduser() if timeline else None
    else:
        raise InputError("run=None: name the run (run=rollouts.jsonl, the collect output) or summary=…")
    if not s.is_file():
        raise InputError(f"summary={str(s)!r}: no such file (collect writes <output>.summary.json at the end)")
    if t is not None and not t.is_file():
        t = None  # a run without a timeline still has a summary to read
    return s, t


def load_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"summary={str(path)!r}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, dict) or "engines" not in data:
        raise InputError(f"summary={str(path)!r}: not a collect summary (no 'engines')")
    return data


def load_timeline(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line of a killed run
    return records


async def scrape(urls: list[str], api_key: str | None, interval_s: float = 2.0,
                 timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """Two /metrics snapshots per engine ``interval_s`` apart: gauges from the second, preemptions as the
    difference (the counter since the engine started says nothing about now)."""
    from rollout_plugin.pool.transport.http import HttpEngineClient
    from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics

    clients = [HttpEngineClient(f"engine{i}", url, api_key=api_key, model="", max_connections=1, connect_s=timeout_s,
                                request_s=timeout_s, admission_s=timeout_s, health_s=timeout_s)
               for i, url in enumerate(urls)]
    try:
        first = await asyncio.gather(*(c.metrics() for c in clients))
        await asyncio.sleep(interval_s)  # the observation window, not a synchronisation
        second = await asyncio.gather(*(c.metrics() for c in clients))
    finally:
        for c in clients:
            await c.aclose()
    out: dict[str, dict[str, Any]] = {}
    for url, before, now in zip(urls, first, second):
        if before is None or now is None:
            raise InputError(f"urls: {url} gave no /metrics (is it a vLLM server, and up?)")
        m0, m = parse_vllm_metrics(before), parse_vllm_metrics(now)
        out[url] = {"running": m.running, "waiting": m.waiting, "kv_usage": m.kv_usage,
                    "preemptions": (m.preemptions_total or 0.0) - (m0.preemptions_total or 0.0)}
    return out
