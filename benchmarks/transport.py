"""Client CPU and wall time per request, by concurrency, against vLLM-shaped servers (run by hand, not a test).

    .venv/bin/python benchmarks/transport.py [--requests 2000] [--rounds 3] [--concurrency 8 64 512 2048] [--stream]
    .venv/bin/python benchmarks/transport.py --requests 50 --rounds 1 --concurrency 8 32 --per-slot 1   # smoke

Two servers (tests/vllm_shaped_server.py, one process each, so their CPU is not counted here) answer
``/v1/completions`` at once. Per concurrency C, side by side, each round in a rotated order:

- ``client``: the pool's engine client (:class:`HttpEngineClient`, aiohttp), one per server, C calls in flight;
- ``aiohttp``: a raw aiohttp session posting the same bodies, the reference;
- ``httpx``: the pool's client before issue 16 (one pooled ``httpx.AsyncClient`` per engine), for comparison;
- ``pool`` / ``pool-httpx``: end to end through :class:`RolloutPool` over the two URLs with ``per_engine=C``
  (so up to 2C calls in flight), every request with its own seed so nothing packs; with the pool's client
  and with the old one.

CPU is ``time.process_time()`` of this process over the timed section only (connections are opened by
an untimed warm-up of C requests first); medians over rounds. Each timed section sends
``max(--requests, --per-slot × C)`` requests. Targets (issue 16): the pool ≤ 300 µs CPU per request at
every C up to 2,048, and within 2.5× of raw aiohttp at 512.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from vllm_shaped_server import spawn  # noqa: E402

from rollout_plugin.config.schema import (  # noqa: E402
    ControllerConfig,
    ControllerMode,
    EngineConfig,
    PoolConfig,
    PrewarmConfig,
)
from rollout_plugin.pool.transport.http import HttpEngineClient, Reply, sampling_body  # noqa: E402
from rollout_plugin.pool.core.engine_client import Malformed, TimedOut, Unavailable  # noqa: E402
from rollout_plugin.pool.api.pool import RolloutPool  # noqa: E402
from rollout_plugin.pool.transport.sse import aiter_events  # noqa: E402
from rollout_plugin.types import Request, SamplingParams  # noqa: E402

MODEL = "shaped"


class HttpxEngineClient(HttpEngineClient):
    """The pool's engine client before issue 16: one pooled httpx.AsyncClient per engine (benchmark-only)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        limit = kw["max_connections"]
        self._httpx = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(connect=kw["connect_s"], read=kw["request_s"], write=kw["request_s"],
                                  pool=kw["admission_s"]),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))

    async def aclose(self) -> None:
        await self._httpx.aclose()
        await super().aclose()

    async def _send(self, method: str, url: str, body: dict[str, Any] | None = None, *, timeout: Any = None,
                    again: bool = True) -> Reply:  # noqa: ARG002  (httpx: no retry, as before issue 16)
        try:
            resp = await self._httpx.request(method, url, json=body)
        except httpx.TimeoutException as exc:
            raise TimedOut(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        return Reply(resp.status_code, resp.content, resp.headers)

    async def _post_stream(self, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from rollout_plugin.pool.transport.http import raise_for_status as _raise_for_status
        from rollout_plugin.pool.transport.sse import merge_choice as _merge_delta

        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        merged: dict[int, dict[str, Any]] = {}
        usage: dict[str, Any] = {}
        try:
            async with self._httpx.stream("POST", self.api_base + path, json=body) as resp:
                if resp.status_code != 200:
                    _raise_for_status(self.name, resp.status_code, (await resp.aread()).decode(), resp.headers)
                async for data in aiter_events(resp.aiter_bytes()):
                    if data.strip() == "[DONE]":
                        break
                    event = json.loads(data)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        _merge_delta(merged.setdefault(choice["index"], {"index": choice["index"]}), choice)
        except httpx.TimeoutException as exc:
            raise TimedOut(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:
            raise Malformed(f"{self.name}: malformed event in stream") from exc
        return [merged[i] for i in sorted(merged)], usage


def requests(start: int, count: int) -> list[Request]:
    """Distinct seeds: no two requests share sampling params, so the pool cannot pack them."""
    return [Request(f"r{i}", "p", sampling=SamplingParams(max_tokens=4, seed=i)) for i in range(start, start + count)]


async def fan_out(count: int, concurrency: int, call: Callable[[int], Awaitable[Any]]) -> None:
    """``count`` calls, ``concurrency`` at a time: one worker per slot, no semaphore."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i, next_index = next_index, next_index + 1
            await call(i)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, count)):
            tg.create_task(worker())


def client_kw(c: int, stream: bool) -> dict[str, Any]:
    return dict(api_key=None, model=MODEL, max_connections=c, connect_s=10, request_s=600, admission_s=600,
                health_s=5, stream=stream)


async def timed(run: Callable[[int], Awaitable[None]], warm: int, count: int) -> tuple[float, float]:
    await run(warm)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await run(count)
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def engine_client(urls: list[str], c: int, count: int, stream: bool, cls: type[HttpEngineClient]):
    clients = [cls(f"engine{i}", url, **client_kw(c, stream)) for i, url in enumerate(urls)]
    reqs = requests(0, count)

    async def run(n: int) -> None:
        async def call(i: int) -> None:
            (gen,) = await clients[i % len(clients)].generate([reqs[i]])
            assert len(gen.samples) == 1

        await fan_out(n, c, call)

    try:
        return await timed(run, c, count)
    finally:
        for client in clients:
            await client.aclose()


async def raw_aiohttp(urls: list[str], c: int, count: int, stream: bool):
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    headers = {"Content-Type": "application/json"}
    reqs = requests(0, count)
    extra = {"stream": True} if stream else {}
    targets = [f"{url}/v1/completions" for url in urls]
    async with aiohttp.ClientSession(connector=connector) as session:
        async def run(n: int) -> None:
            async def call(i: int) -> None:
                body = json.dumps({"model": MODEL, "prompt": [reqs[i].prompt], **sampling_body(reqs[i].sampling, 1),
                                   **extra}).encode()
                async with session.post(targets[i % len(targets)], data=body, headers=headers) as resp:
                    if stream:
                        async for _ in aiter_events(resp.content.iter_any()):
                            pass
                    else:
                        assert len(json.loads(await resp.read())["choices"]) == 1

            await fan_out(n, c, call)

        return await timed(run, c, count)


async def through_pool(urls: list[str], c: int, count: int, stream: bool, cls: type[HttpEngineClient]):
    engine = EngineConfig(urls=urls, served_model_name=MODEL)
    pool_cfg = PoolConfig(per_engine=c, over_concurrency_ratio=1.0, stream=stream, prewarm=PrewarmConfig(requests=0))
    async with RolloutPool(engine, pool_cfg, ControllerConfig(mode=ControllerMode.off), client_factory=cls) as pool:
        start = 0

        async def run(n: int) -> None:
            nonlocal start
            results = await pool.generate(requests(start, n))
            start += n
            assert all(r.ok for r in results), next(r.error for r in results if not r.ok)

        out = await timed(run, 2 * c, count)
        stats = pool.stats()
    calls = sum(e.calls for e in stats.engines)
    if calls != stats.requests_done:  # distinct seeds must mean one call per request
        print(f"  warning: {calls} calls for {stats.requests_done} requests (packed)")
    return out


VARIANTS: dict[str, Callable[..., Awaitable[tuple[float, float]]]] = {
    "client": lambda urls, c, n, s: engine_client(urls, c, n, s, HttpEngineClient),
    "aiohttp": raw_aiohttp,
    "httpx": lambda urls, c, n, s: engine_client(urls, c, n, s, HttpxEngineClient),
    "pool": lambda urls, c, n, s: through_pool(urls, c, n, s, HttpEngineClient),
    "pool-httpx": lambda urls, c, n, s: through_pool(urls, c, n, s, HttpxEngineClient),
}


async def measure(args: argparse.Namespace, urls: list[str]) -> dict[int, dict[str, list[tuple[float, float, int]]]]:
    names = args.variants
    out: dict[int, dict[str, list[tuple[float, float, int]]]] = {}
    for c in args.concurrency:
        count = max(args.requests, args.per_slot * c)
        out[c] = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotated: no variant always runs first
            for name in order:
                cpu, wall = await VARIANTS[name](urls, c, count, args.stream)
                out[c][name].append((cpu, wall, count))
                print(f"  C={c} round {r + 1} {name}: {cpu / count * 1e6:.0f} µs CPU/request, {wall:.2f} s wall",
                      flush=True)
    return out


def report(results: dict[int, dict[str, list[tuple[float, float, int]]]]) -> list[dict[str, Any]]:
    rows = []
    print(f"\n{'C':>5} {'variant':>11} {'CPU µs/req':>11} {'wall s':>8} {'req/s':>8} {'CPU vs aiohttp':>15}")
    for c, by_name in results.items():
        ref = statistics.median(cpu / n for cpu, _, n in by_name["aiohttp"]) if "aiohttp" in by_name else None
        for name, runs in by_name.items():
            cpu = statistics.median(cpu / n for cpu, _, n in runs)
            wall = statistics.median(w for _, w, _ in runs)
            n = runs[0][2]
            ratio = f"{cpu / ref:.2f}×" if ref else "-"
            print(f"{c:>5} {name:>11} {cpu * 1e6:>11.0f} {wall:>8.2f} {n / wall:>8.0f} {ratio:>15}")
            rows.append({"concurrency": c, "variant": name, "cpu_us_per_request": cpu * 1e6, "wall_s": wall,
                         "requests": n, "rounds": len(runs)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per timed section, at least")
    parser.add_argument("--per-slot", type=int, default=4, help="…and at least this many per unit of concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64, 512, 2048])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--stream", action="store_true", help="SSE calls instead of JSON")
    parser.add_argument("--json", help="also write the medians here")
    args = parser.parse_args()
    load_start = os.getloadavg()
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, httpx {httpx.__version__}; "
          f"{'SSE' if args.stream else 'JSON'} calls; load average at start {load_start}")
    with spawn(2, MODEL) as urls:
        results = asyncio.run(measure(args, urls))
    rows = report(results)
    print(f"load average at end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average_start": load_start, "load_average_end": os.getloadavg(),
                                               "cpus": os.cpu_count(), "stream": args.stream, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
