"""A hypothesis state machine over the real pool, its real HTTP client and vLLM-shaped engines, on virtual time.

Each example draws a pool (1–3 engines, streamed / long-only / whole calls, retries, restarts, how weights
are verified) and then a schedule of steps: submits (token or chat prompts, n 1–4, 1–6 tokens), time passing,
engine deaths (restarted with the initial weights: stale until refit), calls ended engine-side to move at a step's
end (``/abort_requests``), in-stream errors (once, or on every
call), a proxy cutting every call, a failure that recurs at one token position, ``/pause`` refusing, reloads
(and so refits) failing half-way, restarts failing, weight updates in every :class:`UpdateMode`, with a
remembered source, loaded inline, or raising inside, with or without ``max_staleness`` — started as tasks, so
they overlap — and ``close`` at any point. The engines are
:class:`vllm_fake_client.FakeVllm` (vLLM 0.32's wire shapes and control API, each behaviour citing the vLLM
file it copies), reached through the pool's own ``HttpEngineClient``. Invariants:

1. Every id resolves once: a Result, or ``PoolError`` — never ``CancelledError``, never a hang: with no
   close, everything submitted and every update resolves within ``BOUND_S`` virtual seconds after the last
   step (this also covers "nothing waits forever when no engine can serve").
2. No ok result has a sample without a finish reason, with an engine-side ``abort`` / ``error``, or with
   fewer (or other) tokens than its budget — token positions must read 0, 1, …, max_tokens - 1.
3. Every result's weight versions are versions an engine reported holding (``/weight_info``, or the initial
   0), each token's weights (encoded in it, as vLLM stamps each output) are its segment's version, and none is
   older than ``v - max_staleness`` once ``weight_update(v, max_staleness=...)`` returned.
4. No engine stays paused once every weight update has returned or raised.

Knob: ``POOL_MACHINE_EXAMPLES`` (default 1500, the ``make test`` figure; ≥ 10000 for the issue-19 soak),
``POOL_MACHINE_STEPS`` (steps per example, default 20). Each example runs in milliseconds of CPU.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import traceback

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, GroupConfig, GroupMode, PoolConfig
from rollout_plugin.config.schema import TimeoutConfig, WeightVerify
from rollout_plugin.errors import EngineError, PoolError
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.weights.sources import FolderWeights, UpdateMode
from rollout_plugin.sim.loop import VirtualTimeLoop
from rollout_plugin.types import Request, Result, SamplingParams
from vllm_fake_client import CORRUPT, FakeCluster, FakeProvider, weights_of

EXAMPLES = int(os.environ.get("POOL_MACHINE_EXAMPLES", "1500"))
STEPS = int(os.environ.get("POOL_MACHINE_STEPS", "20"))
# Virtual seconds after the last step by which everything must have resolved: the pool's own bound for callers
# when no engine can serve (pool.timeouts.hopeless_s, 60 s) plus the stall detector (10 s here) and slack.
BOUND_S = 120.0
TRANSPORTS = {"stream": (True, None), "long": (False, 3), "whole": (False, None)}  # (pool.stream, stream_min_tokens)
FINISHED = ("length", "stop")  # how a sample may end in an ok result

engine_index = st.integers(0, 2)


def while_open(step):
    """A step that does nothing once the pool is closed (after close only time passes: every rule stays valid,
    so Hypothesis never has to retry a draw)."""

    @functools.wraps(step)
    def run_if_open(self, *args, **kwargs):
        if not self.closed:
            return step(self, *args, **kwargs)

    return run_if_open


# One exception type per invariant: Hypothesis tells failures apart by type and line, so each broken
# invariant is reported (and shrunk) on its own.
class Violation(AssertionError):
    pass


class Hang(Violation):
    """Invariant 1: something submitted (or an update) never resolved."""


class BadResolution(Violation):
    """Invariant 1: an id resolved as neither a Result nor PoolError (cancelled, another exception), or not once."""


class BadSample(Violation):
    """Invariant 2: an ok result with a sample cut short, unfinished, or with lost / doubled tokens."""


class WrongVersion(Violation):
    """Invariant 3: a result tagged with weights no engine reported holding, or other than made its tokens."""


class TooStale(Violation):
    """Invariant 3: a result resolved after ``weight_update(v, max_staleness=m)`` returned holds tokens older than
    ``v - m``."""


class LeftPaused(Violation):
    """Invariant 4: an engine stayed paused after every update returned or raised."""


class UpdateRaised(Violation):
    """An update raised something other than EngineError / PoolError (a bug, not a verdict)."""


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualTimeLoop()
        self.pool: RolloutPool | None = None
        self.closed = False
        self.futures: list[tuple[Request, asyncio.Future]] = []
        self.updates: list[asyncio.Task] = []
        self.version = 0  # the last version an update asked for
        self.violations: list[tuple[type[Violation], str]] = []
        self.checked: set[int] = set()
        self.admitted = 0  # ids the pool took (a failed pool refuses at submit)
        self.floor = 0  # the oldest version a result may hold now: max(version - max_staleness) of returned updates
        self.floors: dict[int, int] = {}  # each future's floor when it resolved

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    # -- setup ---------------------------------------------------------------------------------------
    @initialize(engines=st.integers(1, 3), transport=st.sampled_from(sorted(TRANSPORTS)),
                retries=st.integers(0, 3), restarts=st.integers(0, 2), verify=st.sampled_from(list(WeightVerify)),
                pack=st.integers(1, 8), per_engine=st.integers(4, 16), mode=st.sampled_from(list(GroupMode)))
    def start(self, engines, transport, retries, restarts, verify, pack, per_engine, mode):
        stream, min_tokens = TRANSPORTS[transport]
        self.cluster = FakeCluster(stream=stream, stream_min_tokens=min_tokens)
        self.provider = FakeProvider(self.cluster)
        cfg = PoolConfig(per_engine=per_engine, over_concurrency_ratio=1.0, pack_size=pack, max_retries=retries,
                         max_restarts=restarts, verify_weights=verify, groups=GroupConfig(mode=mode),
                         backoff_base_s=0.01, backoff_cap_s=0.2, stream=stream, stream_min_tokens=min_tokens,
                         timeouts=TimeoutConfig(health_s=0.5, request_s=60.0, stall_s=10.0))

        async def open_pool() -> RolloutPool:
            clients = [self.cluster.client(s.name, s.url) for s in (self.cluster.spawn(f"e{i}")
                                                                    for i in range(engines))]
            pool = RolloutPool(pool=cfg, controller=ControllerConfig(mode=ControllerMode.off), clients=clients,
                               clock=self.loop.time, client_factory=self.cluster.client)
            pool.provider = self.provider  # restarts: a fresh process with the initial weights
            return await pool.__aenter__()

        self.pool = self.run(open_pool())

    def server(self, index: int):
        names = sorted(self.cluster.current)
        return self.cluster.current[names[index % len(names)]]

    # -- traffic and time ------------------------------------------------------------------------------
    @rule(count=st.integers(1, 4), n=st.integers(1, 4), max_tokens=st.integers(1, 6), chat=st.booleans())
    @while_open
    def submit(self, count, n, max_tokens, chat=False):
        """Token prompts ``[marker]``, or chat prompts the engine renders to that one token."""
        async def go():
            for _ in range(count):
                i = len(self.futures)
                prompt = [{"role": "user", "content": str(10 * i + 1)}] if chat else [10 * i + 1]
                req = Request(f"r{i}", prompt, n=n, sampling=SamplingParams(max_tokens=max_tokens))
                try:
                    fut = self.pool.submit(req)
                    fut.add_done_callback(self._resolved)
                    self.admitted += 1
                except PoolError as exc:  # the pool has failed (no engine left): it says so at once
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(exc)
                self.futures.append((req, fut))
            await asyncio.sleep(0)

        self.run(go())

    def _resolved(self, fut: asyncio.Future) -> None:
        self.floors[id(fut)] = self.floor  # the staleness bound in force when it resolved

    @rule(dt=st.sampled_from([0.005, 0.02, 0.1, 0.5, 2.0, 15.0]))
    def wait(self, dt):
        self.run(asyncio.sleep(dt))

    # -- faults --------------------------------------------------------------------------------------
    @rule(engine=engine_index)
    @while_open
    def kill(self, engine):
        self.server(engine).kill()
        self.run(asyncio.sleep(0))

    @rule(engine=engine_index, after=st.integers(0, 4), every_call=st.booleans())
    @while_open
    def stream_error(self, engine, after, every_call):
        """The engine's next call (or every call) fails after ``after`` steps: an in-stream error event."""
        s = self.server(engine)
        if every_call:
            s.always_error_after = after
        else:
            s.stream_errors.append(after)

    @rule(engine=engine_index, after=st.integers(0, 4))
    @while_open
    def proxy_resets(self, engine, after):
        """From now on a proxy cuts every call to this engine after ``after`` steps (its idle timeout)."""
        self.server(engine).resets_after = after

    @rule(engine=engine_index, position=st.integers(1, 4), kind=st.sampled_from(["event", "reset"]))
    @while_open
    def poison(self, engine, position, kind):
        """From now on every call to this engine fails when a sample reaches ``position`` (an error event, or the
        connection cut): a failure that recurs after the same tokens however often the sample continues."""
        self.server(engine).poisoned = (position, kind)

    @rule(engine=engine_index, calls=st.integers(1, 3))
    @while_open
    def spread(self, engine, calls):
        """A step's end as the monitor sees it (pool/policy/spread.py): the engine's oldest calls end engine-side
        (``/abort_requests``) and continue elsewhere from the tokens vLLM answered with."""
        dispatcher = self.pool._require()  # type: ignore[union-attr]

        async def go():  # the monitor calls it on the pool's loop
            dispatcher.spread_calls(engine % len(dispatcher.clients), calls)
            await asyncio.sleep(0)

        self.run(go())

    @rule(engine=engine_index)
    @while_open
    def pause_refuses(self, engine):
        self.server(engine).pause_failures += 1

    @rule(engine=engine_index)
    @while_open
    def reload_fails(self, engine):
        self.server(engine).reload_failures += 1

    @rule()
    @while_open
    def restart_fails(self):
        self.provider.failures += 1

    # -- weight updates ------------------------------------------------------------------------------
    @rule(mode=st.sampled_from([m.value for m in UpdateMode]), how=st.sampled_from(["source", "inline", "raises"]),
          max_staleness=st.one_of(st.none(), st.integers(0, 1)))
    @while_open
    def update(self, mode, how, max_staleness=None):
        """Start a weight update as a task (a later update overlaps it unless something awaited it)."""
        self.version += 1
        version, pool = self.version, self.pool

        async def go():
            if how == "source":
                await pool.update_weights(version, FolderWeights(f"w{version}"), mode=mode,
                                          max_staleness=max_staleness)
                return
            async with pool.weight_update(version, mode=mode, max_staleness=max_staleness):
                if how == "raises":
                    raise EngineError("the trainer's broadcast failed")
                await FolderWeights(f"w{version}").load(pool, pool.live_engines())

        def returned(task: asyncio.Task) -> None:
            if max_staleness is not None and not task.cancelled() and task.exception() is None:
                self.floor = max(self.floor, version - max_staleness)  # no later result may hold older tokens

        async def start():
            task = asyncio.ensure_future(go())
            task.add_done_callback(returned)
            task.add_done_callback(self._update_done)
            self.updates.append(task)
            await asyncio.sleep(0)

        self.run(start())

    def _update_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (EngineError, PoolError)):
                where = "".join(traceback.format_exception(exc)[-3:])
                self.violations.append((UpdateRaised, f"an update raised {type(exc).__name__}: {exc}\n{where}"))
        if all(t.done() for t in self.updates):
            paused = [f"{s.name} (mode={s.pause_mode})" for s in self.cluster.current.values()
                      if s.pause_mode is not None and not s.dead]
            if paused:
                self.violations.append((LeftPaused, f"every update returned or raised, engines still paused: "
                                                    f"{paused}"))

    @rule()
    def await_updates(self):
        if self.closed or all(t.done() for t in self.updates):
            return
        self.run(asyncio.wait([t for t in self.updates if not t.done()], timeout=BOUND_S))

    @rule()
    @while_open
    def close(self):
        self.closed = True
        self._close()

    def _close(self) -> None:
        try:
            self.run(self.pool.__aexit__(None, None, None))
        except PoolError:
            pass  # the pool failed (no engine left) and says so on exit

    # -- invariants ----------------------------------------------------------------------------------
    def expect(self, ok: object, kind: type[Violation], message: str) -> None:
        if not ok:
            raise kind(message)

    @invariant()
    def results_are_sound(self):
        for kind, message in self.violations:
            self.expect(False, kind, message)
        if self.pool is None:
            return
        for req, fut in self.futures:
            if fut.done() and id(fut) not in self.checked:
                self.checked.add(id(fut))
                self._check(req, fut)

    def _check(self, req: Request, fut: asyncio.Future) -> None:
        expect = self.expect
        expect(not fut.cancelled(), BadResolution, f"{req.id}: its future was cancelled")
        exc = fut.exception()
        expect(exc is None or isinstance(exc, PoolError), BadResolution,
               f"{req.id}: raised {type(exc).__name__}: {exc}")
        if exc is not None:
            return
        res: Result = fut.result()
        expect(res.id == req.id, BadResolution, f"{req.id}: answered as {res.id}")
        if not res.ok:
            return
        expect(len(res.samples) == req.n, BadSample, f"{req.id}: {len(res.samples)} samples for n={req.n}")
        reported = {0} | self.cluster.reported_versions()
        for s in res.samples:
            expect(s.finish_reason in FINISHED, BadSample, f"{req.id}: ok with finish_reason {s.finish_reason!r}: {s}")
            tokens = s.token_ids or ()
            positions = [t % 1000 for t in tokens]
            expect(positions == list(range(req.sampling.max_tokens)), BadSample,
                   f"{req.id}: ok with token positions {positions} for max_tokens={req.sampling.max_tokens}")
            made = {weights_of(t) for t in tokens}
            expect(CORRUPT not in made, WrongVersion, f"{req.id}: ok with tokens from half-loaded weights: {s}")
            if self.pool.pool_cfg.verify_weights != WeightVerify.off:
                expect(set(s.versions) <= reported, WrongVersion,
                       f"{req.id}: versions {s.versions}, engines reported holding {sorted(reported)}")
            for seg in s.segments:
                if seg.start is not None and seg.end is not None:
                    span = {weights_of(t) for t in tokens[seg.start:seg.end]}
                    expect(span <= {seg.version}, WrongVersion,
                           f"{req.id}: tokens made by weights {span} tagged version {seg.version}: {s}")
            expect(made <= set(s.versions), WrongVersion,
                   f"{req.id}: tokens made by weights {sorted(made)}, segments say {s.versions}")
        oldest = min(v for s in res.samples for v in s.versions)
        expect(res.weight_version == oldest, WrongVersion, f"{req.id}: weight_version {res.weight_version}, "
                                                          f"oldest segment {oldest}")
        floor = self.floors.get(id(fut), 0)
        expect(oldest >= floor, TooStale, f"{req.id}: tokens of version {oldest} after an update bounded staleness "
                                          f"to versions >= {floor}: {res.samples}")

    def teardown(self):
        try:
            if self.pool is None:
                return
            pending = [f for _, f in self.futures] + self.updates  # after a close: updates still out
            if pending:
                self.run(asyncio.wait(pending, timeout=BOUND_S))
            hung = [r.id for r, f in self.futures if not f.done()]
            stuck = [t for t in self.updates if not t.done()]
            self.expect(not hung and not stuck, Hang, f"{len(hung)} request(s) {hung[:5]} and {len(stuck)} update(s) "
                                                      f"unresolved {BOUND_S:g} virtual s after the last step")
            if not self.closed:
                self._close()
            self.run(asyncio.sleep(0))
            for req, fut in self.futures:
                self.expect(fut.done(), BadResolution, f"{req.id}: unresolved after close")
            self.results_are_sound()
            ledger = self.pool._dispatcher.ledger  # type: ignore[union-attr]
            self.expect(not ledger.tickets and not ledger.calls, BadResolution, "the ledger kept work after close")
            resolved = sum(ledger.outcomes.values())  # Ledger.resolve counts each id it ends: exactly once each
            self.expect(resolved == self.admitted, BadResolution, f"{resolved} resolutions for {self.admitted} ids")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.loop.is_closed():
            return
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


PoolMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no "explain": minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestPoolMachine = PoolMachine.TestCase


def setup_module() -> None:
    # Thousands of schedules log every fault they inject; only the verdicts matter here.
    logging.getLogger("rollout_plugin").setLevel(logging.CRITICAL)


def teardown_module() -> None:
    logging.getLogger("rollout_plugin").setLevel(logging.NOTSET)


# The known defects of issue 19 as the machine finds them, shrunk by hand to their smallest schedules: each must
# hold on a fixed pool (and fails on the code before the fix; see the ids).
START = {"engines": 1, "transport": "stream", "retries": 1, "restarts": 1, "verify": WeightVerify.checksum,
         "pack": 1, "per_engine": 4, "mode": GroupMode.auto}
SCHEDULES = {
    # An in-stream error after a token: the client took the cut sample as finished (client.py _post_stream).
    "in_stream_error_is_not_ok": [("stream_error", {"engine": 0, "after": 1, "every_call": False}),
                                  ("submit", {"count": 1, "n": 1, "max_tokens": 3})],
    # A chat sample fails at the same token on every call: each try after tokens gave its attempt back and,
    # with chat's prompt ids unread (top-level in vLLM's chunk), started over for ever (outcomes.py _continue).
    "retries_after_tokens_are_bounded": [("poison", {"engine": 0, "position": 2, "kind": "reset"}),
                                         ("submit", {"count": 1, "n": 1, "max_tokens": 3, "chat": True})],
    # Weights loaded without a source, the only engine dies and restarts stale: callers waited for ever.
    "stale_engine_fails_callers": [("update", {"mode": "drain", "how": "inline"}), ("await_updates", {}),
                                   ("kill", {"engine": 0}), ("submit", {"count": 1, "n": 1, "max_tokens": 2})],
    # One engine cannot pause: the one that did was never resumed (operations.py weight_update).
    "a_failed_pause_resumes_the_others": [("pause_refuses", {"engine": 0}), ("update", {"mode": "keep",
                                                                                       "how": "source"})],
    # A reload that fails half-way: the half-loaded engine stayed in rotation under the old version.
    "half_loaded_engine_serves_nothing": [("reload_fails", {"engine": 0}),
                                          ("update", {"mode": "drain", "how": "source"}),
                                          ("submit", {"count": 1, "n": 1, "max_tokens": 2})],
    # Two updates at once: the first one's exit readmitted work while the second was loading.
    "overlapping_updates_are_serialized": [("submit", {"count": 2, "n": 2, "max_tokens": 6}),
                                           ("update", {"mode": "drain", "how": "source"}), ("wait", {"dt": 0.1}),
                                           ("update", {"mode": "drain", "how": "inline"}),
                                           ("submit", {"count": 2, "n": 1, "max_tokens": 6})],
    # A refit from the last source after an inline load: the engine rejoined tagged with a version it lacks.
    "refit_never_tags_an_older_source": [("update", {"mode": "drain", "how": "source"}), ("await_updates", {}),
                                         ("update", {"mode": "drain", "how": "inline"}), ("await_updates", {}),
                                         ("kill", {"engine": 0}), ("wait", {"dt": 2.0}),
                                         ("submit", {"count": 1, "n": 1, "max_tokens": 2})],
    # max_staleness=0 after a continue-mode update: the continued sample kept its version-0 prefix (issue 19 item 4).
    "max_staleness_is_a_bound": [("submit", {"count": 1, "n": 1, "max_tokens": 6}), ("wait", {"dt": 0.035}),
                                 ("update", {"mode": "continue", "how": "source"}), ("wait", {"dt": 0.035}),
                                 ("update", {"mode": "keep", "how": "source", "max_staleness": 0})],
    # Close while a keep update's /pause fan-out is in flight: a /pause that lands after close's /resume stayed
    # (an attached vLLM then queues every later caller's request for good).
    "close_leaves_no_engine_paused": [("wait", {"dt": 2.0}), ("update", {"mode": "keep", "how": "source"}),
                                      ("close", {}), ("wait", {"dt": 0.1})],
}
ENGINES = {"a_failed_pause_resumes_the_others": 2, "overlapping_updates_are_serialized": 2,
           "close_leaves_no_engine_paused": 3}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_known_schedule(name):
    machine = PoolMachine()
    engines = ENGINES.get(name, 1)
    try:
        machine.start(**{**START, "engines": engines})
        for step, kwargs in SCHEDULES[name]:
            getattr(machine, step)(**kwargs)
            machine.results_are_sound()
    except BaseException:
        machine._shutdown()
        raise
    machine.teardown()


def test_the_fake_engine_queues_while_paused_and_aborts_with_the_tokens_so_far():
    """The fault model the machine relies on, through the real client: a paused engine queues a call until
    /resume (it does not refuse it); /pause?mode=abort ends a running call with its tokens and finish "abort";
    a restarted process holds the initial weights."""
    from rollout_plugin.pool.core.engine_client import new_progress
    from rollout_plugin.sim.loop import run_virtual

    async def main():
        cluster = FakeCluster(stream=True)
        client = cluster.client("e0", cluster.spawn("e0").url)
        req = Request("r0", [1], n=2, sampling=SamplingParams(max_tokens=3))
        await client.admin("/pause?mode=keep")
        queued = asyncio.ensure_future(client.generate([req], progress=new_progress([req])))
        await asyncio.sleep(5.0)
        assert not queued.done()
        await client.admin("/resume")
        (gen,) = await queued
        assert [s.token_ids for s in gen.samples] == [(0, 1, 2)] * 2 and gen.samples[0].finish_reason == "length"
        progress = new_progress([req])
        running = asyncio.ensure_future(client.generate([req], progress=progress))
        await asyncio.sleep(0.015)  # one step in
        await client.admin("/pause?mode=abort")
        (gen,) = await running
        assert [(s.token_ids, s.finish_reason) for s in gen.samples] == [((0,), "abort")] * 2
        assert progress[0][0].token_ids == [0]  # streamed as the HTTP client reports it
        await client.admin("/resume")
        await cluster.client("e0", cluster.current["e0"].url).admin(
            "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "w3"}})
        fresh = cluster.client("e0", cluster.spawn("e0").url)  # a restart: a new process
        assert (await fresh.admin("/weight_info", method="GET")) == {"weight_version": "default"}
        (gen,) = await fresh.generate([req])
        assert {weights_of(t) for s in gen.samples for t in s.token_ids} == {0}

    run_virtual(main())
