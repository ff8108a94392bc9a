"""Engines that die, hang or run out of KV, for real: SIGKILL, SIGSTOP, --num-gpu-blocks-override.

The hang stops vLLM's engine-core process, not its API server: that is what a wedged GPU looks like
(the API process keeps answering /health and /metrics, with frozen counters), and stopping the whole
group would be undone by the kernel (an orphaned process group with stopped members gets SIGCONT)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig, TimeoutConfig
from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics
from rollout_plugin.types import Request, SamplingParams

pytestmark = [pytest.mark.engine, pytest.mark.slow]

WORK = SamplingParams(max_tokens=48, ignore_eos=True)


def start_engine(live_engine, tmp_path, *extra: str) -> EngineProcess:
    cfg = EngineConfig(model=live_engine.model_dir, api_key=live_engine.api_key, max_model_len=1024,
                       cpu_kvcache_gb=1, extra_args=list(extra), log_dir=str(tmp_path))
    (port,) = reserve_ports(cfg.host, 0, 1)
    proc = EngineProcess(1, cfg, model=live_engine.model_dir, port=port, max_num_seqs=128, cpu_bind=None,
                         log_dir=tmp_path)
    proc.start()
    return proc


@pytest.fixture
def victim(live_engine, tmp_path) -> Iterator[EngineProcess]:
    proc = start_engine(live_engine, tmp_path)
    try:
        asyncio.run(proc.wait_ready())
        yield proc
    finally:
        proc.stop()


def pair(live_engine, victim: EngineProcess) -> EngineConfig:
    return EngineConfig(urls=[live_engine.url, victim.url], api_key=live_engine.api_key,
                        served_model_name=live_engine.model_dir, max_model_len=1024)


def engine_core_pids(leader: int) -> list[int]:
    """The engine's processes other than its API server (vLLM runs the engine core in a child)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == leader and int(stat.parent.name) != leader:
            pids.append(int(stat.parent.name))
    return pids


def kill_group(sig: signal.Signals) -> Callable[[EngineProcess], None]:
    return lambda proc: os.killpg(proc.proc.pid, sig)


def stop_engine_core(proc: EngineProcess) -> None:
    pids = engine_core_pids(proc.proc.pid)
    assert pids, "vLLM's engine core runs in the API server's process here; this test needs a child"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


async def engine_metrics(url: str):
    """What the engine itself reports now (its /metrics), as opposed to what the pool has read of it."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return parse_vllm_metrics(await resp.text())


def pool_has_read(pool: RolloutPool, engine: int) -> tuple[int, bool]:
    """The output tokens the pool has read from ``engine`` (finished calls and streams under way), and whether
    one of its samples is cut mid-way in what was read (tokens, no finish)."""
    parts = [p for c in pool._dispatcher.ledger.calls if c.engine == engine and c.progress
             for parts in c.progress for p in parts]
    read = pool.stats().engines[engine].output_tokens + sum(len(p.token_ids) for p in parts)
    return read, any(p.token_ids and p.finish_reason is None for p in parts)


class RunEndedFirst(Exception):
    """The precondition failed on timing: every sample of the run finished before the victim was caught."""


async def catch_mid_sample(pool: RolloutPool, victim: EngineProcess, task: asyncio.Future) -> None:
    """Stop the victim's engine core while it decodes, and return once the pool has read every token the
    victim produced and one of them is a sample cut mid-way: a kill then cuts exactly what the pool saw.

    On a loaded machine the pool reads a stream seconds behind the engine that writes it (CI, stops 24 and 26:
    a victim killed "mid-sample" had finished, its last samples completed from the socket's buffer, and nothing
    was continued). With its core stopped the victim can finish nothing more, and its own counter
    (``vllm:generation_tokens_total``) says when the pool has caught up."""

    def give_up(why: str) -> None:
        pytest.fail(f"the victim was never caught mid-sample ({why}; victim: {pool.stats().engines[1]})")

    while True:
        # Stopped as soon as it has work, not once the pool has seen a partial sample: on a loaded machine the pool
        # may read each of the victim's streams in one piece, and never see one half-read (CI, session 11).
        while not any(c.engine == 1 for c in pool._dispatcher.ledger.calls):  # polling the pool: work on the victim
            if task.done():
                raise RunEndedFirst(f"the run ended first; victim: {pool.stats().engines[1]}")
            await asyncio.sleep(0.05)
        cores = engine_core_pids(victim.proc.pid)
        for pid in cores:
            os.kill(pid, signal.SIGSTOP)
        settled: tuple[float, int] | None = None
        while True:  # polling the engine and the pool: the pool reads what the stopped core had produced
            if not pool.stats().engines[1].healthy:
                return  # taken out while stopped: the pool cut its calls itself; the kill changes nothing
            produced = (await engine_metrics(victim.url)).generation_tokens_total
            read, mid = pool_has_read(pool, 1)
            if produced is None:
                give_up("its /metrics has no vllm:generation_tokens_total")
            if produced == read and settled == (produced, read):
                break
            settled = (produced, read) if produced == read else None
            await asyncio.sleep(0.2)
        if mid:
            return
        for pid in cores:  # stopped between samples (or before its first token): let it go on to its next ones
            os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(120):
            while ((await engine_metrics(victim.url)).generation_tokens_total <= produced and not task.done()
                   and any(c.engine == 1 for c in pool._dispatcher.ledger.calls)):
                await asyncio.sleep(0.05)  # polling the engine: it made progress before it is stopped again


STALL_S = 10.0


async def run_and_break(live_engine, victim: EngineProcess, breaker: Callable[[EngineProcess], None],
                        tmp_path, health_s: float = 2.0) -> tuple[list, object, float]:
    """Stream 192 groups of 2; at the first result (most work still queued, so the pool keeps sending
    to the victim), break the victim; wait until the pool has taken it out of rotation.
    Returns the results, the stats and the seconds from the break to the victim's removal."""
    ctl = ControllerConfig(interval_s=0.5, timeline=str(tmp_path / "t.jsonl"))
    pool_cfg = PoolConfig(per_engine=8, k=2, pack_size=4, max_retries=3,
                          timeouts=TimeoutConfig(request_s=600, health_s=health_s, stall_s=STALL_S))
    results, killed, broke_at, dead_at = [], False, 0.0, None
    reqs = [Request(f"g{i}", f"Story {i}:", n=2, sampling=WORK) for i in range(192)]
    async with RolloutPool(pair(live_engine, victim), pool_cfg, ctl) as pool:
        async with asyncio.timeout(400):
            async for result in pool.stream(reqs):
                results.append(result)
                if not killed:
                    breaker(victim)
                    killed, broke_at = True, time.monotonic()
                if dead_at is None and not pool.stats().engines[1].healthy:
                    dead_at = time.monotonic()
            while pool.stats().engines[1].healthy:  # the health probe may still be under way
                await asyncio.sleep(0.05)
            dead_at = dead_at or time.monotonic()
        stats = pool.stats()
    return results, stats, dead_at - broke_at


def assert_nothing_lost(results, stats) -> None:
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)) == 192 and all(r.ok and len(r.samples) == 2 for r in results)
    assert [e.healthy for e in stats.engines] == [True, False]


async def test_engine_killed_mid_run_loses_nothing(live_engine, victim, tmp_path):
    results, stats, _ = await run_and_break(live_engine, victim, kill_group(signal.SIGKILL), tmp_path)
    assert_nothing_lost(results, stats)


async def test_a_sample_whose_engine_is_killed_continues_from_its_tokens_elsewhere(live_engine, victim):
    """Streamed calls: the pool saw each sample's tokens as they came; after SIGKILL, every unfinished
    sample goes on on the other engine from prompt + its tokens, for exactly the rest of its budget."""
    budget = 900  # long: the victim decodes for seconds, so stopping it at its first streamed token finds it mid-sample
    # A SIGKILL is seen by the refused connections, not by the stall detector; a short stall_s would let a
    # loaded 2-core machine (a fresh engine's first batches) take the victim out before it streamed a token,
    # and the precondition below would never hold (CI, stop 24).
    pool_cfg = PoolConfig(per_engine=8, pack_size=4, stream_min_tokens=256,
                          timeouts=TimeoutConfig(request_s=600, health_s=2, stall_s=180))
    async with RolloutPool(pair(live_engine, victim), pool_cfg, ControllerConfig(mode="off")) as pool:
        missed = []
        for attempt in range(3):  # a loaded machine may let a whole run finish before the victim is caught
            reqs = [Request(f"s{i}", [1, 10 + i, 20, 30 + attempt], n=2,
                            sampling=SamplingParams(max_tokens=budget, ignore_eos=True)) for i in range(12)]
            task = asyncio.ensure_future(pool.generate(reqs))
            try:
                async with asyncio.timeout(300):
                    while pool.stats().engines[1].output_tokens == 0 and not pool._dispatcher.ledger.calls:
                        await asyncio.sleep(0.05)  # polling the pool: work under way
                    await catch_mid_sample(pool, victim, task)
                break
            except RunEndedFirst as exc:
                missed.append(str(exc))
                await task  # whole results: the next run starts from a quiet pool
        else:
            pytest.fail(f"the victim was never caught mid-sample in 3 runs (machine too loaded): {missed}")
        kill_group(signal.SIGKILL)(victim)
        results = await asyncio.wait_for(task, 400)
        stats = pool.stats()
    assert all(r.ok for r in results) and len({r.id for r in results}) == 12
    assert stats.continued > 0  # some samples went on from their tokens instead of starting over
    for r in results:
        for s in r.samples:
            # the budget exactly: no token lost or doubled at the cut, wherever the sample continued
            assert len(s.token_ids) == budget, (r.id, len(s.token_ids), s.segments)
            assert s.segments[0].start == 0 and s.segments[-1].end == budget


async def hang_once(live_engine, victim: EngineProcess, tmp_path: Path) -> tuple[list[str], float]:
    """One run whose victim's engine core stops: the reasons the victim was declared dead, and how fast."""
    tmp_path.mkdir(exist_ok=True)
    # health_s 5: a scrape that a loaded machine answers late is not taken for a silent engine.
    results, stats, detect_s = await run_and_break(live_engine, victim, stop_engine_core, tmp_path, health_s=5.0)
    assert_nothing_lost(results, stats)
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    return [e["reason"] for e in events if e["kind"] == "health" and e["new"] == "dead"], detect_s


async def test_hung_engine_is_detected_within_the_stall_timeout_and_its_work_moves(live_engine, victim, tmp_path):
    reasons, detect_s = await hang_once(live_engine, victim, tmp_path / "first")
    if reasons and reasons[0].startswith("no answer"):
        # The precondition (the API server answers /metrics while its engine core is stopped) did not hold: on a
        # loaded machine the victim's API server missed a scrape and a /health probe (CI, stop 26), so the silent
        # check, not the stall detector, took it out. Its work still moved; once more with a fresh victim.
        victim.stop()
        again = start_engine(live_engine, tmp_path)
        try:
            await again.wait_ready()
            reasons, detect_s = await hang_once(live_engine, again, tmp_path / "again")
        finally:
            again.stop()
        if reasons and reasons[0].startswith("no answer"):
            pytest.fail("the stall detector was never first: twice the victim's API server stopped answering "
                        "/metrics and /health within 5 s while its engine core was stopped (machine too loaded)")
    assert len(reasons) == 1 and reasons[0].startswith("hung"), reasons
    # stall_s plus a poll interval and a scrape; slack for a loaded 2-core machine.
    assert detect_s < STALL_S + 15, f"the hang took {detect_s:.1f} s to detect"


async def test_kv_starved_engine_pressure_is_weighed_by_what_a_cut_buys(live_engine, tmp_path):
    # The CPU backend's blocks are 128 tokens: 64 blocks hold 8,192 tokens. vLLM admits ~64 of these sequences
    # (one block each) and preempts as they grow into their second block.
    starved = start_engine(live_engine, tmp_path, "--num-gpu-blocks-override", "64")
    try:
        await starved.wait_ready()
        engine = EngineConfig(urls=[starved.url], api_key=live_engine.api_key, served_model_name=live_engine.model_dir,
                              max_model_len=1024)
        # expected_tokens small on purpose: the first cap (77) and its ceiling (154) are above what KV holds.
        # Short trials, so that verdicts come while work still waits.
        ctl = ControllerConfig(interval_s=0.5, trial_s=1.5, expected_tokens=8, timeline=str(tmp_path / "kv.jsonl"))
        # Enough work that the backlog outlasts the cap's records and a verdict on them: with less, a fast machine
        # is left with a remainder that fits in the cap, where no cut is ever made (it would only stretch the tail).
        reqs = [Request(f"r{i}", f"Tell me about {i}", sampling=SamplingParams(max_tokens=192, ignore_eos=True))
                for i in range(768)]
        # max_concurrent high: the engine's own cap, not the pool's global one, is what limits it.
        async with RolloutPool(engine, PoolConfig(per_engine=64, pack_size=4, max_concurrent=1024), ctl) as pool:
            results = await pool.generate(reqs)
            state = pool.monitor.states[0]
    finally:
        starved.stop()
    assert all(r.ok for r in results)
    events = [json.loads(line) for line in (tmp_path / "kv.jsonl").read_text().splitlines()]
    samples = [e for e in events if e["kind"] == "sample" and e["preemptions"] is not None]
    assert samples and samples[-1]["preemptions"] > samples[0]["preemptions"], "the engine never preempted"
    # Preemption is no longer cut on by rule (issue 13): the controller puts a cut on trial and keeps it only if
    # tokens/s held, or finds from its records that the cap with preemptions buys more than a lower one did.
    # Which verdict this engine gets depends on the machine; that it is weighed at all does not.
    trials = [e for e in events if e["kind"] == "cap" and "cut on trial" in e["reason"]]
    # ...or a raise into the pressure is measured and undone because it cost tokens/s (a loaded machine).
    raises_undone = [e for e in events if e["kind"] == "cap" and e["reason"].startswith("the raise to")]
    caps = [(e["old"], e["new"], e["reason"]) for e in events if e["kind"] == "cap"]
    assert trials or state.cheap_found or raises_undone, caps
    undone = [e for e in events if e["kind"] == "cap" and e["reason"].startswith("the cut to")]
    assert all(e["new"] > e["old"] for e in undone)  # a cut that cost tokens/s went back up


async def test_a_killed_launched_engine_is_restarted_and_the_run_completes(model_dir, tmp_path):
    engine = EngineConfig(model=model_dir, max_model_len=512, cpu_kvcache_gb=1, log_dir=str(tmp_path))
    ctl = ControllerConfig(interval_s=0.5, timeline=str(tmp_path / "t.jsonl"))
    reqs = [Request(f"r{i}", f"Once upon a time {i}", sampling=WORK) for i in range(160)]
    results, killed = [], None
    async with RolloutPool(engine, PoolConfig(engines=1, per_engine=16, pack_size=4, max_restarts=1), ctl) as pool:
        async with asyncio.timeout(600):
            async for result in pool.stream(reqs):
                results.append(result)
                if killed is None:
                    killed = pool.processes[0].proc.pid
                    os.killpg(killed, signal.SIGKILL)
        restarted = pool.processes[0].proc.pid
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)) == 160 and all(r.ok for r in results)
    assert restarted != killed
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    health = [(e["old"], e["new"]) for e in events if e["kind"] == "health"]
    # the engine state machine (pool/core/lifecycle.py): a failed call may first make it suspect
    assert health[0][0] == "live" and health[-3:] == [("suspect" if len(health) == 4 else "live", "dead"),
                                                      ("dead", "restarting"), ("restarting", "live")], health
