"""Tail-aware rollout (issue 13): weight-update modes, step quota with carry-over, failover, idle time.

Run by hand on a quiet machine (real vLLM CPU engines, the embedded tiny Llama, max_model_len 1024); every
run prints a Markdown table for benchmarks/RESULTS.md: medians of interleaved rounds (contenders alternate
within each round, the first one rotating), with the 1-minute load average at the start and end of each run.
Workloads are GRPO-shaped: groups of k samples (``n=k``), token-id prompts, lognormal lengths per group
(mean ~150 tokens) forced with ``ignore_eos``, so every contender is asked for exactly the same tokens.

    .venv/bin/python benchmarks/tail.py multistep [--steps 10] [--groups 64] [--k 8] [--rounds 3]
    .venv/bin/python benchmarks/tail.py skewed    [--steps 4]  [--groups 64] [--k 8] [--rounds 3]
    .venv/bin/python benchmarks/tail.py pair      [--groups 64] [--k 8] [--rounds 5] [--unit sample]
    .venv/bin/python benchmarks/tail.py hetero    [--groups 64] [--k 8] [--kv-tokens 2048] [--rounds 5]
    .venv/bin/python benchmarks/tail.py failover  [--groups 32] [--k 8] [--kill-at 0.3] [--rounds 3]
    .venv/bin/python benchmarks/tail.py idle      [--groups 48] [--k 8] [--cap 64] [--rounds 3]
    .venv/bin/python benchmarks/tail.py <which> --quick     # a smoke run: tiny sizes, timings meaningless

Issue 22's real-CPU-pair targets, on a quiet machine (each refuses to start above load 3), one after another; the
times are estimates for this 2-core VM, from a --quick run (hetero: 2 min 18 s, of which ~1.5 min engine start-up)
and the figures in RESULTS.md and issue 22:

    .venv/bin/python benchmarks/tail.py pair   --groups 64 --k 8 --rounds 5                   # ~4-6 min
    .venv/bin/python benchmarks/tail.py hetero --groups 64 --k 8 --kv-tokens 2048 --rounds 5  # ~5-8 min
    .venv/bin/python benchmarks/tail.py multistep --steps 4 --groups 32 --rounds 5 \
        --contenders drain-every-step,quota+keep,quota+continue                               # ~10-12 min
    .venv/bin/python benchmarks/tail.py multistep --rounds 3      # full size, 10 × 64, 4 contenders: ~30-35 min
    # an RL run's shape, as the simulator's multi-step target has it: a trainer step about half a generation step
    # (7 s beside the ~15 s drain step at 4 × 32), staleness ≤ 1, the run trains exactly steps × groups
    .venv/bin/python benchmarks/tail.py multistep --steps 4 --groups 32 --rounds 5 --train-s 7 --exact-source \
        --max-staleness 1 --contenders drain-every-step,quota+keep,quota+continue            # ~20 min

pair/hetero: one step (512 samples, ~65k tokens) per contender per round, 4 contenders (static, verl, pool, pool_off)
× 5 rounds; at the issue's figures (4.6-5.3 s per homogeneous step, 6.8-9.4 s starved) plus ~1-2 s per run to wait
for idle engines and open the pool, ~25 s (pair) / ~40 s (hetero) per round, and ~1.5-2 min to start the engines.
multistep at 4 × 32: ~25-36 s per contender run (RESULTS.md: 5.6-9.0 s per step), 3 contenders × 5 rounds, plus
~2 min start-up; at 10 × 64 each run is ~5× longer.

multistep  10 steps, each asking for 64 groups of 8, on 2 engines, a real weight reload after every step
           (``pool.update_weights(v, FolderWeights(<the model's own folder>), mode=...)``: the same weights,
           really reloaded). Useful tokens/s (tokens of the groups handed to the "trainer" ÷ wall time, updates
           included) and mean step time (generation + update). Contenders:
             drain-every-step  send the step's 64 groups, wait for all, update with mode=drain;
             quota+drain       ``pool.steps(source, in_flight=~1.5×64)``, ``next(64)``, update mode=drain;
             quota+keep        the same, update mode=keep;
             quota+continue    the same, update mode=continue  (the issue's "quota + carry-over").
           Why keep/continue come with the quota: in a plain synchronous loop (send N, wait for all N, update)
           nothing is in flight when the update starts, so drain, keep and continue do exactly the same thing
           (pause, load, resume) and cost the same; ``plain+keep`` / ``plain+continue`` are there to show it
           (``--contenders``). The modes only differ when work is in flight at the update, which is what the
           quota creates: ~1.5×N groups run, a step takes the first N to finish, and the rest are in flight
           when the weights change. Then drain waits for them (the tail comes back at every update), keep freezes
           them in the engines and resumes them under the new weights, continue aborts them and continues each
           sample from its tokens. Leftover groups after the last step are waste and counted as such
           (generated ÷ useful, from the engines' own token counters). Caveat: the quota hands back the groups
           that finish first, so its groups are shorter on average than the source's ("mean len" column);
           tokens/s counts only what was handed back. ``--max-staleness`` bounds how many versions a sample may
           span (default: unbounded). Target (issue 13): the best mode ≥ 1.3× drain-every-step's tokens/s;
           issue 22: ≥ 1.2×. Every contender, drain-every-step included, runs through the same RolloutPool (so the
           same aiohttp client): the baseline is ``pool.generate`` of the step's groups, then a drain update.
           ``--train-s``: the trainer's step between a step's groups and its update (a sleep: the trainer runs on
           other devices, as with a dedicated rollout fleet); drain-every-step's engines idle through it, the
           quota's go on with the next groups. ``--exact-source``: the run trains exactly steps × groups, the last
           step taking every group still in flight (as the simulator's run does), so no leftover is waste and
           every contender trains the same groups.
           Refuses to start above load 3 like ``pair``; ends with a ``SUMMARY multistep`` line.
skewed     A homogeneous pair, skewed lengths, no weight updates: step makespan against the ideal = the step's
           tokens ÷ the pair's steady-state tokens/s, measured in the same round (a uniform workload of the same
           size, every sample in flight; the rate between 20 % and 80 % of each engine's tokens, from its
           /metrics every 0.1 s: the full-batch rate without ramp-up and tail). Contenders: no-quota (send the
           step's groups, wait for all) and quota (``in_flight`` ~1.5×, ``next(groups)``), over ``--steps``
           steps; "× ideal" over all steps and, for the quota, from its second step on (steady state: it starts
           each step with the carried groups half done). A step can't end before its longest sample, which on
           these engines is a sizeable share of the ideal: the quota is how a step stops waiting for it.
           Target: quota ≤ 1.1× the ideal.
pair       Issue 22's real CPU pair, homogeneous: one GRPO step of 64 groups × 8 per round (one ``n=1`` request
           per sample, 512 in all; ``--unit group`` for one ``n=k`` request per group), ≥ 5 interleaved rounds.
           Every contender runs on the pool's own aiohttp transport (``HttpEngineClient``, built as the pool builds
           it), so the client costs the same for all (benchmarks/_tail_pair.py):
             static    TRL server mode / static DP: group i → engine i mod 2, every request at once;
             verl      verl's router: least in flight by request count, no cap, every request at once;
             pool      RolloutPool, defaults (adaptive controller);   pool_off  the same, ``controller.mode=off``.
           The baselines are ``rollout_plugin/sim/baselines.py``'s, on the real clients. A fresh pool per run,
           opened off the clock (``--keep-pools``: one per contender kept across rounds, whose controller then
           also watches the other contenders' traffic). Prints each run, the load average (1/5/15 min) at each
           round's start and end, a Markdown table (median, worst, ÷ static median) and two ``SUMMARY`` lines.
           Refuses to start when the 1-minute load is above 3 (``--allow-load``: a loud warning instead; --quick
           implies it). Targets (issue 22): pool median ≤ 1.0× static's, pool worst ≤ 1.3× static's median.
hetero     The same with engine1 KV-starved (``--num-gpu-blocks-override``; vLLM's CPU blocks hold 128 tokens,
           so ``--kv-tokens 2048`` = 16 blocks; the real size is read back from /metrics and printed). Same
           contenders, same targets.
failover   Kill one of two engines mid-step, once it has generated ``--kill-at`` of its expected share: SIGSTOP
           its engine core (generation stops; the API server still flushes what was made and counts it), read
           its token counter until it settles, then SIGKILL the whole process group. Counted from the engines'
           ``vllm:generation_tokens_total``:
             lost = tokens the killed engine had generated (exact: its settled counter) minus those of results
                    it had already returned — the tokens of samples unfinished when it died;
             regenerated = tokens generated by both engines in the run minus the tokens the results carry.
           Ratio regenerated ÷ lost with ``pool.stream=true`` (the pool sees tokens as they come and continues
           each cut sample from them) vs ``pool.stream=false`` (cut samples start again). A fresh pool per run,
           attached to two engines this script launches (the pool would restart a killed engine it launched, and
           ``stream`` is per pool); the killed engine is relaunched, off the clock, for the next run. The stop
           lets the API server deliver the outputs it already had (≤ one engine step): a crash of the engine core
           alone does the same, a lost node would not.
           Target: ≤ 5 % with streaming (100 % without, by construction).
idle       Seconds the engines generate nothing per weight update: a backlog of groups (``--cap`` per engine,
           controller off, so work queues in the pool), one update once ``--update-at`` of the tokens are
           generated; both engines' ``vllm:generation_tokens_total`` read every ``--period`` s. Per engine: the
           longest spell with no new token that overlaps the update (from the last token before it went quiet to
           the first after). Contenders: drain, keep, continue.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tail_util beside this script, however it is run

from _tail_pair import pair_step  # noqa: E402
from _tail_util import (  # noqa: E402
    KEY, MAX_MODEL_LEN, GroupSpec, Meter, Rounds, Sampler, check_load, check_results, freeze_core, header,
    launch_engine, longest_gap, misfits, order, requests_of, sigkill, skewed_specs, steady_rate)

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig  # noqa: E402
from rollout_plugin.model.embedded import resolve_model  # noqa: E402
from rollout_plugin.pool.api.pool import RolloutPool  # noqa: E402
from rollout_plugin.pool.weights.sources import FolderWeights  # noqa: E402

QUICK = {  # tiny sizes for a smoke run (the engines' start-up still takes what it takes)
    "multistep": dict(steps=2, groups=4, k=2, mean=32, rounds=3),
    "skewed": dict(steps=2, groups=4, k=2, mean=32, rounds=3),
    "hetero": dict(groups=8, k=2, mean=32, rounds=3),
    "pair": dict(groups=8, k=2, mean=32, rounds=3),
    "failover": dict(groups=8, k=2, mean=96, rounds=3),
    "idle": dict(groups=8, k=2, mean=96, cap=4, rounds=3),
}
DEFAULTS = {
    "multistep": dict(steps=10, groups=64, k=8, rounds=3),
    "skewed": dict(steps=4, groups=64, k=8, rounds=3),
    "hetero": dict(groups=64, k=8, rounds=5),
    "pair": dict(groups=64, k=8, rounds=5),
    "failover": dict(groups=32, k=8, rounds=3),
    "idle": dict(groups=48, k=8, rounds=3),
}


def launched(model: str, k: int, controller: ControllerConfig | None = None, **pool_kw) -> RolloutPool:
    """Two vLLM CPU engines launched by the pool itself (dev mode: pause/resume, reload_weights)."""
    engine = EngineConfig(model=model, dev_mode=True, max_model_len=MAX_MODEL_LEN, cpu_kvcache_gb=1,
                          log_dir="logs/bench")
    return RolloutPool(engine, PoolConfig(engines=2, k=k, **pool_kw), controller)


def meter_of(pool: RolloutPool) -> Meter:
    return Meter([ep.url for ep in pool.endpoints], [ep.api_key for ep in pool.endpoints])


async def still_whole(pool: RolloutPool, meter: Meter, label: str) -> None:
    """Stop the benchmark if an engine died, hung or restarted during ``label``: its timings (and, after a
    restart, its token counters) no longer describe the contenders."""
    down = [e.name for e in pool.stats().engines if not e.healthy]
    unread = [i for i, m in enumerate(await meter.all()) if m.generation_tokens_total is None]
    if down or unread:
        raise SystemExit(f"{label}: engine(s) {down or unread} died, hung or restarted during the run (see the pool's "
                         f"log above and logs/bench/); the numbers so far are not valid")


# -- multistep ---------------------------------------------------------------------------------------------
async def plain_loop(pool: RolloutPool, meter: Meter, specs: list[GroupSpec], args, mode: str,
                     label: str) -> dict[str, float]:
    reqs = requests_of(specs[:args.steps * args.groups], args.k, label)
    before, useful, steps, updates = sum(await meter.tokens()), 0, [], []
    t0 = time.perf_counter()
    for s in range(args.steps):
        ts = time.perf_counter()
        useful += check_results(await pool.generate(reqs[s * args.groups:(s + 1) * args.groups]), label)
        await asyncio.sleep(args.train_s)  # the trainer's step: nothing is in flight, the engines idle
        tu = time.perf_counter()
        await pool.update_weights(pool.weight_version + 1, FolderWeights(args.model_dir), mode=mode)
        updates.append(time.perf_counter() - tu)
        steps.append(time.perf_counter() - ts)
    wall = time.perf_counter() - t0
    return await _step_figures(meter, before, useful, wall, steps, updates, args)


async def quota_loop(pool: RolloutPool, meter: Meter, specs: list[GroupSpec], args, mode: str,
                     label: str) -> dict[str, float]:
    reqs = requests_of(specs, args.k, label)
    before, useful, steps, updates = sum(await meter.tokens()), 0, [], []
    t0 = time.perf_counter()
    async with pool.steps(reqs, in_flight=args.in_flight) as quota:
        for _ in range(args.steps):
            ts = time.perf_counter()
            groups = await quota.next(args.groups)
            if len(groups) != args.groups:
                raise SystemExit(f"{label}: a step got {len(groups)} groups, asked for {args.groups}")
            useful += check_results(groups, label)
            await asyncio.sleep(args.train_s)  # the trainer's step: the engines go on with the next groups
            tu = time.perf_counter()
            await pool.update_weights(pool.weight_version + 1, FolderWeights(args.model_dir), mode=mode,
                                      max_staleness=args.max_staleness)
            updates.append(time.perf_counter() - tu)
            steps.append(time.perf_counter() - ts)
        wall = time.perf_counter() - t0
        if quota.failed:
            raise SystemExit(f"{label}: {len(quota.failed)} group(s) failed, e.g. {quota.failed[0].error}")
    return await _step_figures(meter, before, useful, wall, steps, updates, args)


async def _step_figures(meter: Meter, before: float, useful: int, wall: float, steps: list[float],
                        updates: list[float], args) -> dict[str, float]:
    await meter.wait_quiet()  # what the contender left running has stopped: its tokens are all counted
    generated = sum(await meter.tokens()) - before
    return {"tok/s": useful / wall, "step s": statistics.mean(steps), "update s": statistics.mean(updates),
            "mean len": useful / (args.steps * args.groups * args.k), "generated/useful": generated / useful}


MULTISTEP = {
    "drain-every-step": (plain_loop, "drain"),
    "plain+keep": (plain_loop, "keep"),
    "plain+continue": (plain_loop, "continue"),
    "quota+drain": (quota_loop, "drain"),
    "quota+keep": (quota_loop, "keep"),
    "quota+continue": (quota_loop, "continue"),
}


async def multistep(args) -> None:
    names = args.contenders.split(",") if args.contenders else \
        ["drain-every-step", "quota+drain", "quota+keep", "quota+continue"]
    unknown = [n for n in names if n not in MULTISTEP]
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; choose from {', '.join(MULTISTEP)}")
    # --exact-source: the run trains exactly steps × groups (as the simulator's run does), so the last step takes
    # every group still in flight and nothing is left over; otherwise enough groups for every step plus what the
    # quota keeps in flight, the leftovers counted as waste.
    extra = 0 if args.exact_source else 2 * args.in_flight
    specs = skewed_specs(args.steps * args.groups + extra, seed=13, mean=args.mean, sigma=args.sigma)
    load_at_start = check_load(args.allow_load or args.quick)
    rounds = Rounds(args.rounds)
    async with launched(args.model_dir, args.k) as pool:
        meter = meter_of(pool)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: load average at start {os.getloadavg()[0]:.1f}", flush=True)
            for name in order(names, r):
                fn, mode = MULTISTEP[name]
                await rounds.measure(name, lambda: fn(pool, meter, specs, args, mode, f"{name}-r{r}"),
                                     "tok/s,step s,update s,generated/useful")
                await still_whole(pool, meter, f"{name}, round {r + 1}")
            print(f"round {r + 1}/{args.rounds}: load average at end {os.getloadavg()[0]:.1f}", flush=True)
        await meter.aclose()
    base = rounds.median("drain-every-step", "tok/s")
    header(f"multistep: 2 engines, {args.steps} steps × {args.groups} groups × k={args.k}, lognormal lengths "
           f"(mean {args.mean:.0f}, σ {args.sigma}), a real weight reload after each step, quota in_flight "
           f"{args.in_flight}, max_staleness {args.max_staleness}, trainer {args.train_s:g} s per step, "
           f"{'exact source' if args.exact_source else 'source with spare groups'}", args.rounds)
    rounds.table([("useful tok/s", "tok/s"), ("mean step (s)", "step s"), ("mean update (s)", "update s"),
                  ("mean len", "mean len"), ("generated ÷ useful", "generated/useful")], per_round="tok/s",
                 extra=lambda n: [f"{rounds.median(n, 'tok/s') / base:.2f}×"], extra_headers=["vs drain-every-step"])
    best = max(rounds.runs, key=lambda n: rounds.median(n, "tok/s"))
    worst = rounds.lowest(best, "tok/s")
    print(f"\nSUMMARY multistep: drain-every-step median {base:.0f} tok/s | best {best} median "
          f"{rounds.median(best, 'tok/s'):.0f} tok/s = {rounds.median(best, 'tok/s') / base:.2f}× (issue 22 target "
          f"≥ 1.2), its worst round {worst:.0f} tok/s = {worst / base:.2f}× | "
          + " | ".join(f"{n} {rounds.median(n, 'tok/s') / base:.2f}×" for n in rounds.runs)
          + f" | load {load_at_start:.1f} at start")


# -- skewed ------------------------------------------------------------------------------------------------
async def uniform_rate(pool: RolloutPool, meter: Meter, args, label: str) -> dict[str, float]:
    specs = [GroupSpec(s.prompt, round(args.mean)) for s in skewed_specs(args.groups, 7, args.mean, args.sigma)]
    async with Sampler(meter, 0.1) as sampler:
        t0 = time.perf_counter()
        tokens = check_results(await pool.generate(requests_of(specs, args.k, label)), label)
        span = time.perf_counter() - t0
    steady = sum(steady_rate(s) for s in sampler.series)
    if steady != steady:  # NaN: too few readings inside the run (tiny sizes); said, not hidden
        print("  (steady-state rate not measurable in so short a run: the ideal uses tokens ÷ makespan)", flush=True)
        steady = tokens / span
    return {"steady tok/s": steady, "makespan tok/s": tokens / span}


async def skew_steps(pool: RolloutPool, specs: list[GroupSpec], args, quota: bool, label: str,
                     rate: float) -> dict[str, float]:
    reqs = requests_of(specs, args.k, label)
    spans, tokens = [], []
    if quota:
        async with pool.steps(reqs, in_flight=args.in_flight) as steps:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                tokens.append(check_results(await steps.next(args.groups), label))
                spans.append(time.perf_counter() - t0)
    else:
        for s in range(args.steps):
            t0 = time.perf_counter()
            tokens.append(check_results(await pool.generate(reqs[s * args.groups:(s + 1) * args.groups]), label))
            spans.append(time.perf_counter() - t0)
    out = {"step s": statistics.mean(spans), "× ideal": sum(spans) / (sum(tokens) / rate)}
    if quota and args.steps > 1:
        out["× ideal, steps 2+"] = sum(spans[1:]) / (sum(tokens[1:]) / rate)
    return out


async def skewed(args) -> None:
    specs = skewed_specs(args.steps * args.groups + 2 * args.in_flight, seed=17, mean=args.mean, sigma=args.sigma)
    rounds = Rounds(args.rounds)
    async with launched(args.model_dir, args.k) as pool:
        meter = meter_of(pool)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            rate = (await rounds.measure("steady-state", lambda: uniform_rate(pool, meter, args, f"u-r{r}"),
                                         "steady tok/s,makespan tok/s"))["steady tok/s"]
            for name in order(["no-quota", "quota"], r):
                await meter.wait_quiet()
                await rounds.measure(name, lambda: skew_steps(pool, specs, args, name == "quota", f"{name}-r{r}",
                                                              rate), "step s,× ideal,× ideal, steps 2+")
                await still_whole(pool, meter, f"{name}, round {r + 1}")
        await meter.aclose()
    header(f"skewed: homogeneous pair, {args.steps} steps × {args.groups} groups × k={args.k}, lognormal lengths "
           f"(mean {args.mean:.0f}, σ {args.sigma}, longest {max(s.length for s in specs)}), quota in_flight "
           f"{args.in_flight}; ideal = step tokens ÷ steady-state tok/s of the same round", args.rounds)
    rounds.table([("steady tok/s", "steady tok/s"), ("makespan tok/s", "makespan tok/s"), ("mean step (s)", "step s"),
                  ("× ideal", "× ideal"), ("× ideal, steps 2+", "× ideal, steps 2+")], per_round="× ideal")
    print(f"\nquota: {rounds.median('quota', '× ideal'):.2f}× ideal (steps 2+: "
          f"{rounds.median('quota', '× ideal, steps 2+'):.2f}×), "
          f"no quota {rounds.median('no-quota', '× ideal'):.2f}× (target ≤ 1.1×)")


# -- failover ----------------------------------------------------------------------------------------------
async def failover_run(urls: list[str], victim, specs: list[GroupSpec], args, stream: bool,
                       label: str) -> dict[str, float]:
    meter = Meter(urls, [KEY, KEY])
    engine = EngineConfig(urls=urls, api_key=KEY, served_model_name=args.model_dir, max_model_len=MAX_MODEL_LEN)
    total = sum(s.length for s in specs) * args.k
    try:
        async with RolloutPool(engine, PoolConfig(k=args.k, stream=stream), ControllerConfig()) as pool:
            g0, g1 = await meter.tokens()
            t0 = time.perf_counter()
            futures = [pool.submit(r) for r in requests_of(specs, args.k, label)]
            while True:  # kill once the victim made --kill-at of its share
                made = (await meter.one(1)).generation_tokens_total or 0.0
                if made - g1 >= args.kill_at * total / 2:
                    break
                if all(f.done() for f in futures):
                    raise SystemExit(f"{label}: the step finished before the kill point; raise --groups or "
                                     f"lower --kill-at")
                await asyncio.sleep(0.05)
            freeze_core(victim)  # generation stops here; the API server flushes what was made and counts it
            at_kill = await meter.settled(1)
            returned = sum(f.result().output_tokens for f in futures
                           if f.done() and f.result().ok and f.result().engine == "engine1")
            sigkill(victim)
            results = await asyncio.gather(*futures)
            kept = check_results(results, label, strict=False)  # a wrong length is counted and shown
            span = time.perf_counter() - t0
            await meter.wait_quiet()
            survivor = (await meter.one(0)).generation_tokens_total or 0.0
    finally:
        await meter.aclose()
    lost = at_kill - g1 - returned
    regenerated = (survivor - g0) + (at_kill - g1) - kept
    return {"lost": lost, "regenerated": regenerated, "regenerated/lost": regenerated / lost if lost > 0 else
            float("nan"), "makespan s": span, "wrong-length samples": len(misfits(results))}


async def failover(args) -> None:
    specs = skewed_specs(args.groups, seed=23, mean=args.mean, sigma=args.sigma)
    procs = [launch_engine(0, 2, args.model_dir), launch_engine(1, 2, args.model_dir)]
    rounds = Rounds(args.rounds)
    try:
        await asyncio.gather(*(p.wait_ready() for p in procs))
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for name in order(["stream=true", "stream=false"], r):
                await rounds.measure(name, lambda: failover_run([p.url for p in procs], procs[1], specs, args,
                                                                name == "stream=true", f"{name}-r{r}"),
                                     "lost,regenerated,regenerated/lost,makespan s,wrong-length samples")
                procs[1].stop()  # reaps what the SIGKILL left; then a new victim for the next run
                procs[1] = launch_engine(1, 2, args.model_dir)
                await procs[1].wait_ready()
    finally:
        for p in procs:
            p.stop()
    header(f"failover: 2 engines, engine1 SIGKILLed at {args.kill_at:.0%} of its share, {args.groups} groups × "
           f"k={args.k}, lognormal lengths (mean {args.mean:.0f}, σ {args.sigma})", args.rounds)
    rounds.table([("tokens lost at the kill", "lost"), ("tokens regenerated", "regenerated"),
                  ("regenerated ÷ lost", "regenerated/lost"), ("makespan (s)", "makespan s"),
                  ("wrong-length samples", "wrong-length samples")],
                 per_round="regenerated/lost")
    print(f"\nstream=true: regenerated ÷ lost = {rounds.median('stream=true', 'regenerated/lost'):.1%} "
          f"(target ≤ 5 %); stream=false: {rounds.median('stream=false', 'regenerated/lost'):.1%}")


# -- idle --------------------------------------------------------------------------------------------------
async def idle_run(pool: RolloutPool, meter: Meter, specs: list[GroupSpec], args, mode: str,
                   label: str) -> dict[str, float]:
    total = sum(s.length for s in specs) * args.k
    async with Sampler(meter, args.period) as sampler:
        while not all(sampler.series):
            await asyncio.sleep(args.period)  # a first reading of each engine: the run's baseline
        base = sum(s[-1][1] for s in sampler.series)
        task = asyncio.ensure_future(pool.generate(requests_of(specs, args.k, label)))
        while sum(s[-1][1] for s in sampler.series) - base < args.update_at * total:
            if task.done():
                raise SystemExit(f"{label}: all done before the update point; raise --groups")
            await asyncio.sleep(args.period)
        t0 = time.perf_counter()
        await pool.update_weights(pool.weight_version + 1, FolderWeights(args.model_dir), mode=mode)
        t1 = time.perf_counter()
        check_results(await task, label)
    gaps = [longest_gap(s, t0, t1) for s in sampler.series]
    return {"update s": t1 - t0, "idle engine0 s": gaps[0], "idle engine1 s": gaps[1],
            "idle mean s": statistics.mean(gaps)}


async def idle(args) -> None:
    specs = skewed_specs(args.groups, seed=29, mean=args.mean, sigma=args.sigma)
    rounds = Rounds(args.rounds)
    async with launched(args.model_dir, args.k, per_engine=args.cap,
                        controller=ControllerConfig(mode="off")) as pool:
        meter = meter_of(pool)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for mode in order(["drain", "keep", "continue"], r):
                await meter.wait_quiet()
                await rounds.measure(mode, lambda: idle_run(pool, meter, specs, args, mode, f"{mode}-r{r}"),
                                     "update s,idle engine0 s,idle engine1 s")
                await still_whole(pool, meter, f"{mode}, round {r + 1}")
        await meter.aclose()
    header(f"idle: 2 engines, cap {args.cap} samples per engine (controller off), {args.groups} groups × k={args.k}, "
           f"lognormal lengths (mean {args.mean:.0f}, σ {args.sigma}), one reload at {args.update_at:.0%} of the "
           f"tokens, /metrics every {args.period}s", args.rounds)
    rounds.table([("update call (s)", "update s"), ("engine0 idle (s)", "idle engine0 s"),
                  ("engine1 idle (s)", "idle engine1 s"), ("mean idle (s)", "idle mean s")], per_round="idle mean s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["multistep", "skewed", "pair", "hetero", "failover", "idle"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (timings meaningless)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; pair/hetero 5)")
    ap.add_argument("--steps", type=int, help="steps per run (multistep 10, skewed 4)")
    ap.add_argument("--groups", type=int, help="groups per step (multistep/skewed/pair/hetero 64, failover 32, "
                                               "idle 48)")
    ap.add_argument("--k", type=int, help="samples per group (8)")
    ap.add_argument("--mean", type=float, default=150.0, help="mean sample length in tokens (150)")
    ap.add_argument("--sigma", type=float, default=0.8, help="σ of the log of the lengths (0.8)")
    ap.add_argument("--in-flight", type=int, help="groups the quota keeps in flight (default 1.5 × --groups)")
    ap.add_argument("--max-staleness", type=int, default=None, help="multistep: versions a sample may span")
    ap.add_argument("--contenders", help="multistep: comma-separated, from " + ", ".join(MULTISTEP))
    ap.add_argument("--train-s", type=float, default=0.0,
                    help="multistep: the trainer's seconds per step, between a step's groups and its weight update "
                         "(default 0: no trainer)")
    ap.add_argument("--exact-source", action="store_true",
                    help="multistep: the source holds exactly steps × groups (the last step takes what is left)")
    ap.add_argument("--kv-tokens", type=int, default=2048, help="hetero: engine1's KV cache (tokens)")
    ap.add_argument("--expected-tokens", type=int, default=None, help="pair/hetero: controller hint (default: none)")
    ap.add_argument("--unit", choices=["sample", "group"], default="sample",
                    help="pair/hetero: one n=1 request per sample (issue 22, default) or one n=k request per group")
    ap.add_argument("--log", help="write the pool's INFO log (caps, moves, state changes) to this file")
    ap.add_argument("--plain-engines", action="store_true",
                    help="pair/hetero: engines without dev mode (no /abort_requests: the pool's tail spread stays "
                         "off); by default they run as an RL server does, in dev mode for weight updates")
    ap.add_argument("--keep-pools", action="store_true",
                    help="pair/hetero: one pool per pool contender kept across rounds (its controller then also "
                         "sees the other contenders' traffic); default: a fresh pool per run, opened off the clock")
    ap.add_argument("--allow-load", action="store_true",
                    help="pair/hetero/multistep: run even if the 1-minute load is above 3 (a loud warning; "
                         "--quick implies it)")
    ap.add_argument("--kill-at", type=float, default=0.3, help="failover: share of the victim's tokens at the kill")
    ap.add_argument("--cap", type=int, default=64, help="idle: per-engine cap (samples), so work queues")
    ap.add_argument("--update-at", type=float, default=0.3, help="idle: share of the tokens made before the update")
    ap.add_argument("--period", type=float, default=0.05, help="idle: /metrics sampling period (s)")
    args = ap.parse_args()
    sizes = {**DEFAULTS[args.which], **(QUICK[args.which] if args.quick else {})}
    for key, value in sizes.items():
        if getattr(args, key, None) is None or (args.quick and key in ("mean", "cap")):
            setattr(args, key, value)
    if args.rounds < 3:
        raise SystemExit(f"--rounds={args.rounds}: medians need at least 3 interleaved rounds")
    args.in_flight = args.in_flight or -(-3 * args.groups // 2)
    args.model_dir = resolve_model("embedded:tiny-llama")
    if args.log:
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s.%(msecs)03d %(name)s %(message)s", datefmt="%H:%M:%S")
    asyncio.run({"multistep": multistep, "skewed": skewed, "pair": lambda a: pair_step(a, starved=False),
                 "hetero": lambda a: pair_step(a, starved=True), "failover": failover,
                 "idle": idle}[args.which](args))


if __name__ == "__main__":
    main()
