"""Issue 23's real-engine benchmark: agentic multi-turn sessions on the real CPU pair, makespan and prefix-cache hits.

Workload (per run, per prompt kind): ``groups`` × ``k`` sessions (4 × 8 = 32) of ``turns`` (6) turns. A group's k
sessions share their first prompt (~300 tokens; GRPO's k samples of one prompt); every turn is forced to 40-80 output
tokens (``ignore_eos``; drawn per session and turn, seeded per round, so every contender of a round asks for the same
tokens), then a tool runs (0.2 s, ``asyncio.sleep``: it models the tool) and its output (~60 tokens) is appended:
the next turn's prompt is the whole conversation so far. Prompt contents are random and distinct per run, so no run
finds another's blocks; on top of that each engine's prefix cache is reset (``POST /reset_prefix_cache``, vLLM's dev
route: the engines run with ``VLLM_SERVER_DEV_MODE=1``) before each run.

  --prompts ids   token-id prompts on /v1/completions (verl's agent loop sends token ids): prompt + the turn's
                  output ids + 60 random tool ids (ids 3..2403 of the embedded tiny Llama's vocabulary);
  --prompts chat  chat messages on /v1/chat/completions: the user's first message, then per turn the assistant's
                  answer (the text the engine returned) and a ``tool`` message (random ids decoded to text).
  (default: both, ids first, on the same pair of engines)

Contenders (every turn is one request; every baseline sends through the pool's own aiohttp ``HttpEngineClient``,
built as the pool builds it (``_tail_pair.pool_clients``), so the client costs the same for all):

  pool          RolloutPool with its defaults, fresh per run and opened off the clock; each turn a ``Request`` with
                ``affinity=(<session id>, <group key>)`` as the verl adapter's router sends them (the group's key
                second, so a group's first turns meet their siblings' cached prompt; ``--pool-affinity session``:
                the session's alone), ``pool.end_session(session id)`` after the last turn;
  static        TRL server mode / static DP: TRL's ``vllm_serve`` splits a batch into contiguous chunks, one per
                data-parallel rank, so a group-major batch puts whole groups on one engine: group g -> engine g mod 2
                (the same split when the groups divide evenly), every turn of a session there;
  verl          verl 0.9's ``AsyncLLMServerManager``: a new request id goes to the engine with the fewest requests
                in flight (ties to the lower index), and the id stays on it (an LRU of ids); the agent loop keeps one
                request id per session, so a session is sticky to the engine it started on
                (``rollout_plugin/sim/baselines.py`` ``LeastInflight``'s pattern, here on turns built as they go);
  least_loaded  the same least-in-flight pick for every turn, not sticky: a cache-unaware load balancer
                (``baselines.py`` ``LeastLoaded``), the control for what stickiness buys.

Figures per run: makespan (first request sent to last answer back); the engines' ``vllm:prefix_cache_queries`` and
``vllm:prefix_cache_hits`` deltas over the run, summed over both engines (read once the counters settle); hit rate =
hits ÷ queried; achievable = prompt tokens an earlier request (on any engine) had already computed, in whole blocks of
the engines' block size (128 on vLLM CPU, read from ``vllm:cache_config_info``), at most prompt − 1 (vLLM always
computes a prompt's last token): computed after the run from the exact token ids, replaying the requests in the order
they were sent; a request's prompt counts as computed from its send (a sibling sent later in the same instant meets
it), its prompt + output (all but the last sampled token, never fed back) from its answer. Chat prompts' ids come
from the engine's own ``POST /tokenize`` (the chat template applied; checked against the ``prompt_tokens`` each turn
reported), so a turn whose answer re-tokenizes differently is charged only what really matches. Hit ÷ achievable is
the figure the issue's target names (≥ 0.90 for the pool).

Run by hand on a quiet machine (refuses to start above 1-minute load 3 unless ``--allow-load``), medians of ≥ 3
interleaved rounds (the first contender rotating; engines idle before each run):

    .venv/bin/python benchmarks/sessions.py                       # both prompt kinds, 4 contenders, 3 rounds
    .venv/bin/python benchmarks/sessions.py --prompts ids --rounds 5
    .venv/bin/python benchmarks/sessions.py --quick               # smoke: 2 groups × 2 sessions × 2 turns, 1 round

Time on the 2-core VM, estimated from ``--quick`` (2 min 17 s: ~1.5 min engine start-up, 2-4 s per smoke run plus
~4 s per run to wait for idle engines, reset and settle the counters, open the pool): a full run is 32 sessions × 6
turns, ~10-20 s each, 4 contenders × 3 rounds × 2 prompt kinds = 24 runs, so ~8-12 min in all (~5-7 min per kind).

Prints every run, the load average per round, a Markdown table per prompt kind and one ``SUMMARY sessions`` line
per kind: whether the pool's hit ÷ achievable ≥ 0.90, and pool makespan ÷ static's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tail_util beside this script, however it is run

from _tail_pair import pool_clients  # noqa: E402
from _tail_util import KEY, MAX_LOAD, Meter, Rounds, check_load, header, launch_engine, order  # noqa: E402

from rollout_plugin.config.schema import EngineConfig, PoolConfig  # noqa: E402
from rollout_plugin.model.embedded import resolve_model  # noqa: E402
from rollout_plugin.pool.api.pool import RolloutPool  # noqa: E402
from rollout_plugin.pool.transport.http import HttpEngineClient  # noqa: E402
from rollout_plugin.types import Message, Request, SamplingParams  # noqa: E402

__all__ = ["CONTENDERS", "FULL", "QUICK", "Shape", "achievable"]

CONTENDERS = ("pool", "static", "verl", "least_loaded")
VOCAB = 2404  # the embedded tiny Llama's; ids 0-2 are pad/bos/eos
MODEL_LEN = 2048  # 300 + 6 × (80 + 60) tokens and the chat template's markers need more than _tail_util's 1024


@dataclass(frozen=True)
class Shape:
    groups: int
    k: int  # sessions per group (they share the first prompt)
    turns: int
    prompt: int  # first prompt, tokens
    out_lo: int  # forced output per turn: uniform in [out_lo, out_hi]
    out_hi: int
    tool: int  # tool output appended after a turn, tokens
    tool_s: float  # the tool's latency


FULL = Shape(groups=4, k=8, turns=6, prompt=300, out_lo=40, out_hi=80, tool=60, tool_s=0.2)
QUICK = Shape(groups=2, k=2, turns=2, prompt=300, out_lo=40, out_hi=80, tool=60, tool_s=0.2)


# -- workload ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One session's inputs: its group's first prompt, each turn's forced output length, each tool output."""

    sid: str
    group: int
    first: tuple[int, ...] | str  # token ids, or the user's text (chat)
    outs: tuple[int, ...]
    tools: tuple[tuple[int, ...] | str, ...]


def make_plans(shape: Shape, chat: bool, round_seed: int, content_seed: str,
               decode: Callable[[Sequence[int]], str]) -> list[Plan]:
    """Lengths from ``round_seed`` (the same for every contender of a round), contents from ``content_seed``
    (distinct per run: no run meets another's cached blocks)."""
    lengths, content = random.Random(round_seed), random.Random(content_seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(content.randrange(3, VOCAB) for _ in range(n))

    firsts = [decode(ids(shape.prompt)) if chat else (1,) + ids(shape.prompt - 1) for _ in range(shape.groups)]
    plans = []
    for g in range(shape.groups):
        for s in range(shape.k):
            outs = tuple(lengths.randint(shape.out_lo, shape.out_hi) for _ in range(shape.turns))
            tools = tuple(decode(ids(shape.tool)) if chat else ids(shape.tool) for _ in range(shape.turns - 1))
            plans.append(Plan(f"g{g}s{s}", g, firsts[g], outs, tools))
    return plans


@dataclass(frozen=True)
class Turn:
    """What one turn's request came back with."""

    prompt_tokens: int
    out_ids: tuple[int, ...]
    text: str
    engine: str


Send = Callable[[Plan, int, Request], Awaitable[Turn]]


@dataclass
class Trace:
    """The run's requests in the order they were sent and answered (the achievable count replays it)."""

    events: list[tuple[str, str, object]] = field(default_factory=list)  # ("send", key, prompt) / ("done", key, Turn)
    engines: dict[str, int] = field(default_factory=dict)  # turns per engine


async def run_sessions(plans: Sequence[Plan], shape: Shape, send: Send, label: str,
                       end: Callable[[str], object] | None = None, group_affinity: bool = False) -> Trace:
    trace = Trace()

    async def one(plan: Plan) -> None:
        prompt: list[int] | list[Message] = (
            [{"role": "user", "content": plan.first}] if isinstance(plan.first, str) else list(plan.first))
        affinity = (plan.sid, f"group{plan.group}") if group_affinity else plan.sid
        for t, out in enumerate(plan.outs):
            if t:
                await asyncio.sleep(shape.tool_s)  # the tool runs
            key = f"{label}-{plan.sid}-t{t}"
            req = Request(key, list(prompt), sampling=SamplingParams(max_tokens=out, temperature=1.0, ignore_eos=True),
                          affinity=affinity)
            trace.events.append(("send", key, req.prompt))
            turn = await send(plan, t, req)
            if len(turn.out_ids) != out:
                raise RuntimeError(f"{key}: {len(turn.out_ids)} output tokens, forced {out}")
            trace.events.append(("done", key, turn))
            trace.engines[turn.engine] = trace.engines.get(turn.engine, 0) + 1
            if t + 1 < len(plan.outs):
                tool = plan.tools[t]
                if isinstance(tool, str):
                    prompt = [*prompt, {"role": "assistant", "content": turn.text}, {"role": "tool", "content": tool}]
                else:
                    prompt = [*prompt, *turn.out_ids, *tool]
        if end is not None:
            end(plan.sid)

    try:
        async with asyncio.TaskGroup() as tg:
            for p in plans:
                tg.create_task(one(p))
    except ExceptionGroup as eg:  # a failed turn (or transport verdict) stops the benchmark, naming the first
        raise SystemExit(f"{label}: {eg.exceptions[0]!r}") from None
    return trace


# -- contenders ----------------------------------------------------------------------------------------------
class Router:
    """The baselines' picks (``rollout_plugin/sim/baselines.py``) for turns built as they go: each turn's slot
    is taken before the call awaits, so sessions started together spread as the trainers' routers spread them."""

    def __init__(self, clients: Sequence[HttpEngineClient], kind: str, lru: int = 10_000):
        self.clients, self.kind, self.lru = list(clients), kind, lru
        self.inflight = [0] * len(self.clients)
        self.homes: OrderedDict[str, int] = OrderedDict()  # verl: request id -> server, LRU

    def pick(self, plan: Plan) -> int:
        if self.kind == "static":
            return plan.group % len(self.clients)
        if self.kind == "verl" and plan.sid in self.homes:
            self.homes.move_to_end(plan.sid)
            return self.homes[plan.sid]
        e = min(range(len(self.clients)), key=lambda j: (self.inflight[j], j))
        if self.kind == "verl":
            self.homes[plan.sid] = e
            if len(self.homes) > self.lru:
                self.homes.popitem(last=False)
        return e

    async def send(self, plan: Plan, t: int, req: Request) -> Turn:
        e = self.pick(plan)
        self.inflight[e] += 1
        try:
            (gen,) = await self.clients[e].generate([req])
        finally:
            self.inflight[e] -= 1
        s = gen.samples[0]
        return Turn(gen.prompt_tokens, s.token_ids or (), s.text, self.clients[e].name)


def pool_send(pool: RolloutPool) -> Send:
    async def send(plan: Plan, t: int, req: Request) -> Turn:
        (res,) = await pool.generate([req])
        if not res.ok:
            raise RuntimeError(f"{res.id}: {res.error}")
        s = res.samples[0]
        return Turn(res.prompt_tokens, s.token_ids or (), s.text, res.engine or "?")
    return send


# -- the engines' counters and the achievable hits -------------------------------------------------------------
def _counter(text: str, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name + "_total{") or ln.startswith(name + "_total "))


async def _texts(meter: Meter) -> list[str]:
    replies = await asyncio.gather(*(meter.http.get(f"{u}/metrics", headers=h)
                                     for u, h in zip(meter.urls, meter.headers)))
    for r in replies:
        r.raise_for_status()
    return [r.text for r in replies]


async def cache_counters(meter: Meter, min_s: float = 1.0, period_s: float = 0.3) -> tuple[float, float]:
    """(queried, hit) prompt tokens over both engines, once three readings in a row agree (the stat logger's
    last interval is in) and at least ``min_s`` after the engines went idle."""
    t0, last, same = time.monotonic(), None, 0
    while same < 3 or time.monotonic() - t0 < min_s:
        texts = await _texts(meter)
        now = (sum(_counter(t, "vllm:prefix_cache_queries") for t in texts),
               sum(_counter(t, "vllm:prefix_cache_hits") for t in texts))
        same = same + 1 if now == last else 1
        last = now
        await asyncio.sleep(period_s)  # polling external processes
    assert last is not None
    return last


async def block_size(meter: Meter) -> int:
    m = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', (await _texts(meter))[0])
    return int(m.group(1)) if m else 128  # vLLM CPU's default


async def reset_caches(meter: Meter, tries: int = 20) -> None:
    """Empty each engine's prefix cache; vLLM refuses (success false) while a request holds blocks."""
    for u, h in zip(meter.urls, meter.headers):
        for _ in range(tries):
            r = await meter.http.post(f"{u}/reset_prefix_cache", headers=h)
            r.raise_for_status()  # 404: not in dev mode
            if r.json().get("success"):
                break
            await asyncio.sleep(0.5)  # polling external processes
        else:
            raise SystemExit(f"{u}: /reset_prefix_cache kept answering success=false")


def achievable(events: Sequence[tuple[str, list[int], tuple[int, ...]]], block: int) -> tuple[int, int]:
    """(prompt tokens, achievable hit tokens) of ``(kind, prompt ids, output ids)`` events in order: a prompt's
    leading whole blocks that an earlier request computed (its prompt from its send, prompt + output but the last
    token from its answer), at most prompt − 1 tokens, chained per block as vLLM hashes them."""
    seen: set[int] = set()

    def chain(ids: Sequence[int]) -> list[int]:
        hashes, h = [], 0
        for b in range(len(ids) // block):
            h = hash((h, tuple(ids[b * block:(b + 1) * block])))
            hashes.append(h)
        return hashes

    prompts = hits = 0
    for kind, ids, out in events:
        if kind == "send":
            prompts += len(ids)
            for h in chain(ids)[:(len(ids) - 1) // block]:
                if h not in seen:
                    break
                hits += block
            seen.update(chain(ids))
        else:
            seen.update(chain([*ids, *out[:-1]]))
    return prompts, hits


async def prompt_ids(trace: Trace, meter: Meter, model: str) -> tuple[list[tuple[str, list[int], tuple]], int]:
    """The trace with every prompt as token ids (chat: the engine's own /tokenize, off the clock), and how many
    turns' ids disagree with the ``prompt_tokens`` the engine reported for them."""
    prompts = {key: p for kind, key, p in trace.events if kind == "send"}

    async def ids_of(p: object) -> list[int]:
        if p and isinstance(p[0], int):  # type: ignore[index]
            return list(p)  # type: ignore[arg-type]
        r = await meter.http.post(f"{meter.urls[0]}/tokenize", headers=meter.headers[0],
                                  json={"model": model, "messages": p, "add_generation_prompt": True})
        r.raise_for_status()
        return r.json()["tokens"]

    keys = list(prompts)
    ids = dict(zip(keys, await asyncio.gather(*(ids_of(prompts[k]) for k in keys))))
    events, off = [], 0
    for kind, key, x in trace.events:
        if kind == "send":
            events.append(("send", ids[key], ()))
        else:
            off += x.prompt_tokens != len(ids[key])  # type: ignore[union-attr]
            events.append(("done", ids[key], x.out_ids))  # type: ignore[union-attr]
    return events, off


# -- runs, rounds, report --------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every run of one prompt kind shares: the engines, the baselines' clients, the workload's shape."""

    meter: Meter
    clients: list[HttpEngineClient]
    engine: EngineConfig
    shape: Shape
    chat: bool
    block: int
    decode: Callable[[Sequence[int]], str]
    group_affinity: bool


async def one_run(b: Bench, name: str, r: int, label: str) -> dict[str, float]:
    plans = make_plans(b.shape, b.chat, 1000 + r, label, b.decode)
    await b.meter.wait_quiet()
    if name == "pool":
        async with RolloutPool(b.engine, PoolConfig()) as pool:  # opened off the clock, before the reset
            await b.meter.wait_quiet()
            await reset_caches(b.meter)
            q0, h0 = await cache_counters(b.meter)
            t0 = time.perf_counter()
            trace = await run_sessions(plans, b.shape, pool_send(pool), label, pool.end_session, b.group_affinity)
            span = time.perf_counter() - t0
            left = pool.affinity_keys
            moved = pool.affinity_moves
    else:
        await reset_caches(b.meter)
        q0, h0 = await cache_counters(b.meter)
        t0 = time.perf_counter()
        trace = await run_sessions(plans, b.shape, Router(b.clients, name).send, label)
        span = time.perf_counter() - t0
        left = moved = 0
    await b.meter.wait_quiet()
    q1, h1 = await cache_counters(b.meter)
    events, off = await prompt_ids(trace, b.meter, b.engine.served_model_name or "")
    prompts, ach = achievable(events, b.block)
    if off:
        print(f"  WARNING {label}: {off} turn(s) whose /tokenize ids differ from their prompt_tokens", flush=True)
    if left > (b.shape.groups if b.group_affinity else 0):  # group keys are never ended: their homes stay
        print(f"  WARNING {label}: {left} home(s) left in the pool after every end_session", flush=True)
    q, h = q1 - q0, h1 - h0
    total = sum(trace.engines.values())
    return {"makespan s": span, "queried": q, "hits": h, "prompt tokens": prompts, "achievable": ach,
            "hit rate": h / q if q else float("nan"), "achievable rate": ach / prompts if prompts else float("nan"),
            "hit ÷ achievable": h / ach if ach else float("nan"),
            "engine0 share": trace.engines.get(b.clients[0].name, 0) / total if total else float("nan"),
            "moves": moved}


SHOW = "makespan s,queried,hits,achievable,hit ÷ achievable,engine0 share,moves"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def rounds_of(b: Bench, names: Sequence[str], rounds: int, kind: str) -> Rounds:
    rs = Rounds(rounds)
    for r in range(rounds):
        print(f"[{kind}] round {r + 1}/{rounds}: load average (1/5/15 min) at start {_load()}", flush=True)
        if os.getloadavg()[0] > MAX_LOAD:
            print(f"  WARNING: 1-minute load above {MAX_LOAD:g} at this round's start", flush=True)
        for name in order(names, r):
            await rs.measure(name, lambda: one_run(b, name, r, f"{kind}-{name}-r{r}"), SHOW)
        print(f"[{kind}] round {r + 1}/{rounds}: load average at end {_load()}", flush=True)
    return rs


def report(rs: Rounds, names: Sequence[str], kind: str, b: Bench, load_at_start: float, rounds: int) -> None:
    s = b.shape
    header(f"sessions ({kind} prompts): {s.groups} groups × {s.k} sessions × {s.turns} turns, first prompt "
           f"~{s.prompt} tokens shared per group, {s.out_lo}-{s.out_hi} output tokens per turn (ignore_eos), "
           f"{s.tool_s:g} s tool + ~{s.tool} tool tokens appended; block {b.block}; every baseline on the pool's "
           f"aiohttp client; pool fresh per run; prefix caches reset before each run; load at start "
           f"{load_at_start:.1f}", rounds)
    key = "makespan s"
    st = rs.median("static", key) if "static" in names else float("nan")
    rs.table([("makespan (s)", key), ("queried", "queried"), ("hits", "hits"), ("hit rate", "hit rate"),
              ("achievable rate", "achievable rate"), ("hit ÷ achievable", "hit ÷ achievable"),
              ("engine0 share of turns", "engine0 share")], per_round=key,
             extra=lambda n: [f"{rs.median(n, key) / st:.2f}×",
                              ", ".join(f"{x.values['hit ÷ achievable']:.2f}" for x in rs.runs[n])],
             extra_headers=["makespan ÷ static", "hit ÷ achievable per round"])
    parts = [f"{n} {rs.median(n, key):.2f} s ({rs.median(n, key) / st:.2f}× static), hit ÷ achievable "
             f"{rs.median(n, 'hit ÷ achievable'):.2f}" for n in names]
    print(f"\nSUMMARY sessions ({kind}): " + " | ".join(parts))
    if "pool" in names:
        ratio = rs.median("pool", "hit ÷ achievable")
        worst = rs.lowest("pool", "hit ÷ achievable")
        print(f"SUMMARY sessions ({kind}): pool hit rate ≥ 90 % of achievable: {'MET' if ratio >= 0.9 else 'MISSED'} "
              f"(median {ratio:.2f}, worst round {worst:.2f}); pool makespan ÷ static "
              f"{rs.median('pool', key) / st:.2f} (issue 23: ≤ 1.0 for token ids)")


def decoder(model_dir: str) -> Callable[[Sequence[int]], str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return lambda ids: tok.decode(list(ids))


async def bench(args) -> None:
    load_at_start = check_load(args.allow_load or args.quick)
    procs = [launch_engine(i, 2, args.model_dir, dev_mode=True, max_model_len=MODEL_LEN) for i in range(2)]
    try:
        for p in procs:
            await p.wait_ready()
        urls = [p.url for p in procs]
        meter = Meter(urls, [KEY, KEY])
        clients = pool_clients(urls, args.model_dir)
        engine = EngineConfig(urls=urls, api_key=KEY, served_model_name=args.model_dir, max_model_len=MODEL_LEN)
        print(f"KV tokens per engine (from /metrics): {[m.kv_tokens for m in await meter.all()]}", flush=True)
        blk = await block_size(meter)
        results = []
        try:
            for kind in args.prompts:
                b = Bench(meter, clients, engine, args.shape, kind == "chat", blk, decoder(args.model_dir),
                          args.pool_affinity == "session,group")
                results.append((kind, b, await rounds_of(b, args.contenders, args.rounds, kind)))
        finally:
            for c in clients:
                await c.aclose()
            await meter.aclose()
    finally:
        for p in procs:
            p.stop()
    for kind, b, rs in results:
        report(rs, args.contenders, kind, b, load_at_start, args.rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", choices=["ids", "chat", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (≥ 3; --quick: 1)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help="comma-separated, from " + ", ".join(CONTENDERS))
    ap.add_argument("--pool-affinity", choices=["session", "session,group"], default="session,group",
                    help="the pool's affinity keys per turn (default: the session's, then its group's, as the verl "
                         "adapter's router sends them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 groups × 2 sessions × 2 turns, 1 round")
    ap.add_argument("--allow-load", action="store_true", help="run above 1-minute load 3 (a loud warning; figures "
                                                              "not valid; --quick implies it)")
    args = ap.parse_args()
    args.prompts = ["ids", "chat"] if args.prompts == "both" else [args.prompts]
    args.contenders = [c for c in args.contenders.split(",") if c]
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad or not args.contenders:
        raise SystemExit(f"--contenders: {bad or 'none'}; choose from {', '.join(CONTENDERS)}")
    args.shape = QUICK if args.quick else FULL
    if args.quick:
        args.rounds = 1
    elif args.rounds < 3:
        raise SystemExit(f"--rounds={args.rounds}: medians need at least 3 interleaved rounds")
    args.model_dir = resolve_model("embedded:tiny-llama")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
