"""An engine's life is one state machine (rollout_plugin.pool.core.lifecycle), and nothing waits forever on it.

Issue 19 item 2, through the public API on virtual time: one engine, weights loaded inside
``weight_update()`` with no source (as the gateway's ``/admin/reload_weights`` does), the engine dies and
restarts with its initial weights. Before the state machine the pool counted a stale engine as alive:
every caller waited for ever. Now waiting callers get PoolError within ``pool.timeouts.hopeless_s``;
the same when the refit's load raises; a stale engine with a source is refit and serves; with weights
the trainer pushes at each sync (TRL's NCCL transport) it waits for the next sync instead of failing.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from rollout_plugin.config.schema import ControllerConfig, ControllerMode, PoolConfig, TimeoutConfig
from rollout_plugin.config.validate import Problems, check_pool
from rollout_plugin.errors import ConfigError, PoolError
from rollout_plugin.pool.dispatch.dispatcher import Dispatcher
from rollout_plugin.pool.core.engine_client import Unavailable
from rollout_plugin.pool.engines.launcher import EngineEndpoint
from rollout_plugin.pool.core.lifecycle import (TRANSITIONS, EngineState, IllegalTransition, Outlook, Refit, check,
                                           outlook)
from rollout_plugin.pool.policy.limits import derive_limits
from rollout_plugin.pool import require_ok
from rollout_plugin.pool.api.pool import RolloutPool
from rollout_plugin.pool.weights.sources import FolderWeights
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.types import Request, SamplingParams
from rollout_plugin.viz import load_timeline, plot_timeline
from vllm_like import VllmLike

S = EngineState
FOLDERS = {"w0": 0, "w1": 1, "w2": 2}

# The specification, written out again: (old, new) pairs the state machine allows. Everything else raises.
LEGAL = {
    (S.absent, S.live), (S.absent, S.stale),
    (S.live, S.suspect), (S.suspect, S.live),
    (S.live, S.dead), (S.suspect, S.dead), (S.stale, S.dead), (S.refitting, S.dead),
    (S.dead, S.restarting), (S.restarting, S.live), (S.restarting, S.stale), (S.restarting, S.dead),
    (S.live, S.stale), (S.stale, S.refitting), (S.refitting, S.live), (S.refitting, S.stale),
    (S.live, S.retired), (S.suspect, S.retired), (S.stale, S.retired), (S.dead, S.retired),
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)), ids=lambda s: s.value)
def test_every_transition_is_legal_exactly_when_the_table_says(old, new):
    if (old, new) in LEGAL:
        assert check("e0", old, new) == TRANSITIONS[(old, new)] != ""
    else:
        with pytest.raises(IllegalTransition, match=f"e0: {old.value} -> {new.value} is not a transition"):
            check("e0", old, new)


def test_the_table_holds_exactly_the_legal_transitions_and_retired_is_final():
    assert set(TRANSITIONS) == LEGAL
    assert not [new for old, new in TRANSITIONS if old is S.retired]


class _Client:
    def __init__(self, name: str):
        self.name = name


def dispatcher(**kw) -> Dispatcher:
    limits = derive_limits(max_model_len=4096, engines=1, k=1, ratio=1.0)
    return Dispatcher([_Client("e0")], limits, pack_size=1, max_retries=1, **kw)


def test_the_dispatcher_moves_through_the_table_records_each_change_and_refuses_an_illegal_one():
    async def main():
        changes = []
        d = dispatcher(on_change=lambda *args: changes.append(args[2:4]))
        d.membership._recover = lambda index: True  # it comes back: the pool does not fail under the test
        path = [(S.suspect, "a call failed"), (S.dead, "probe failed"), (S.restarting, "restart 1"),
                (S.stale, "restarted"), (S.refitting, "loading"), (S.live, "refit"), (S.retired, "done")]
        for new, why in path:
            d.membership._move(0, new, why)
        assert changes == [(old.value, new.value) for (old, _), (new, _) in zip([(S.live, "")] + path, path)]
        slot = d._engines[0]
        assert (slot.state, slot.why, slot.healthy, slot.available) == (S.retired, "done", False, False)
        with pytest.raises(IllegalTransition):
            d.membership._move(0, S.live, "a bug")
        assert slot.state is S.retired and len(changes) == len(path)  # nothing happened
    run_virtual(main())


@pytest.mark.parametrize(("state", "derived"), [
    (S.live, (True, True, False, False, False)), (S.suspect, (False, True, True, False, False)),
    (S.dead, (False,) * 5), (S.restarting, (False, False, False, True, False)),
    (S.stale, (False, False, False, False, True)), (S.refitting, (False,) * 5), (S.retired, (False,) * 5)])
def test_the_old_flags_are_derived_from_the_one_state(state, derived):
    async def main():
        d = dispatcher()
        e = d._engines[0]
        e.state = state
        assert (e.available, e.healthy, e.suspect, e.recovering, e.stale) == derived
        assert d.stats().engines[0].state == state.value
    run_virtual(main())


@pytest.mark.parametrize(("engines", "moved", "refit", "expected"), [
    ([(S.live, S.absent), (S.dead, S.live)], True, Refit.none, Outlook.serving),
    ([(S.restarting, S.dead)], False, Refit.none, Outlook.serving),  # back with the weights the pool runs
    ([(S.restarting, S.dead)], True, Refit.held, Outlook.serving),  # back stale, and refit at once
    ([(S.restarting, S.dead)], True, Refit.none, Outlook.stuck),  # back stale, and nothing can refit it
    ([(S.stale, S.restarting), (S.dead, S.live)], True, Refit.none, Outlook.stuck),
    ([(S.stale, S.restarting)], True, Refit.held, Outlook.serving),  # its refit from the source comes next
    ([(S.stale, S.refitting)], True, Refit.held, Outlook.stuck),  # that refit failed
    ([(S.stale, S.refitting)], True, Refit.pushed, Outlook.serving),  # the trainer's next sync reaches it
    ([(S.refitting, S.stale)], True, Refit.held, Outlook.serving),
    ([(S.dead, S.live), (S.retired, S.live)], True, Refit.held, Outlook.gone),
])
def test_alive_means_can_serve_the_current_weights(engines, moved, refit, expected):
    assert outlook(engines, weights_moved=moved, refit=refit) is expected


def test_hopeless_s_is_a_validated_pool_timeout():
    assert TimeoutConfig().hopeless_s <= 60
    p = Problems()
    check_pool(PoolConfig(timeouts=TimeoutConfig(hopeless_s=0)), p)
    with pytest.raises(ConfigError, match=r"pool\.timeouts\.hopeless_s.*must be > 0"):
        p.raise_if_any()


# -- through the public API, on virtual time --------------------------------------------------------------
class Restarts:
    """A backend whose engines restart as fresh processes holding the initial weights."""

    startup_s: list[float] = []

    async def replace(self, index: int) -> EngineEndpoint:
        return EngineEndpoint(f"e{index}", f"http://restarted-{index}", None)

    async def watch(self, on_dead, on_capacity):
        return None

    def can_grow(self, engines: int) -> bool:
        return False

    def close(self) -> None:
        pass


class ReloadFails(VllmLike):
    """vLLM whose ``reload_weights`` raises in the worker: ``/collective_rpc`` has no handler for it
    (vllm/entrypoints/serve/dev/rpc/api_router.py), so the server answers HTTP 500."""

    async def admin(self, path: str, body=None, *, timeout_s=None, method: str = "POST"):
        if path == "/collective_rpc" and (body or {}).get("method") == "reload_weights":
            raise Unavailable(f"{self.name}: POST {path}: HTTP 500 Internal Server Error", status=500)
        return await super().admin(path, body, timeout_s=timeout_s, method=method)


def one_engine_pool(fresh: list, *, fresh_cls=VllmLike, timeline: str | None = None,
                    **cfg) -> tuple[RolloutPool, VllmLike]:
    first = VllmLike("e0")
    first.folders, first.model = FOLDERS, "m"

    def factory(name, url, **_):
        e = fresh_cls(name)  # a new process: initial weights (0), version "default"
        e.folders, e.model = FOLDERS, "m"
        fresh.append(e)
        return e

    pool = RolloutPool(pool=PoolConfig(per_engine=16, pack_size=4, max_restarts=1, **cfg),
                       controller=ControllerConfig(mode=ControllerMode.off, timeline=timeline), clients=[first],
                       clock=asyncio.get_running_loop().time, client_factory=factory)
    pool.provider = Restarts()
    return pool, first


def requests(count: int, tag: str = "r") -> list[Request]:
    return [Request(f"{tag}{i}", [100 + i], n=2, sampling=SamplingParams(max_tokens=20)) for i in range(count)]


async def load_without_a_source(pool: RolloutPool, version: int) -> None:
    """What the gateway's /admin/reload_weights does: the load inside weight_update(), no WeightSource."""
    async with pool.weight_update(version):
        require_ok(await pool.engine_rpc("/collective_rpc", {"method": "reload_weights",
                                                             "kwargs": {"weights_path": f"w{version}"}}))


def test_a_stale_engine_with_no_source_fails_waiting_callers_within_the_bound():
    """Issue 19 item 2 as reported: before, the request waited with no answer and no error for ever."""
    async def main():
        loop = asyncio.get_running_loop()
        fresh: list = []
        pool, first = one_engine_pool(fresh)
        bound = TimeoutConfig().hopeless_s  # the default
        with pytest.raises(PoolError) as info:
            async with pool:
                await load_without_a_source(pool, 1)
                first.dead = True  # SIGKILL: its next call fails, the probe finds it dead, it restarts
                t0 = loop.time()
                try:
                    await asyncio.wait_for(pool.generate(requests(2)), timeout=10 * bound)
                finally:
                    waited = loop.time() - t0
        assert fresh and fresh[0].weights == 0, "the engine was not restarted with its initial weights"
        assert waited <= bound + 5, waited  # the death is found within seconds; then at most the bound
        message = str(info.value)
        assert "no engine can serve weight version 1" in message and "e0 stale" in message
        assert "pool.update_weights(version, source)" in message and "hopeless_s" in message
    run_virtual(main())


def test_a_refit_whose_load_fails_fails_waiting_callers_within_the_bound():
    async def main():
        loop = asyncio.get_running_loop()
        fresh: list = []
        pool, first = one_engine_pool(fresh, fresh_cls=ReloadFails, timeouts=TimeoutConfig(hopeless_s=20.0))
        with pytest.raises(PoolError) as info:
            async with pool:
                await pool.update_weights(1, FolderWeights("w1"))
                first.dead = True
                t0 = loop.time()
                try:
                    await asyncio.wait_for(pool.generate(requests(2)), timeout=600)
                finally:
                    waited = loop.time() - t0
        assert fresh and waited <= 20 + 5, waited
        assert "refit failed" in str(info.value) and "HTTP 500" in str(info.value)
        assert "the refit from folder w1 failed" in str(info.value)
    run_virtual(main())


def test_a_stale_engine_with_a_source_is_refit_and_serves(tmp_path):
    timeline = tmp_path / "t.jsonl"

    async def main():
        fresh: list = []
        pool, first = one_engine_pool(fresh, timeline=str(timeline))
        async with pool:
            await pool.update_weights(1, FolderWeights("w1"))
            first.dead = True
            results = await asyncio.wait_for(pool.generate(requests(4)), timeout=120)
            state = pool.stats().engines[0].state
        assert all(r.ok and r.weight_version == 1 for r in results)
        assert {t // 1000 for r in results for s in r.samples for t in s.token_ids} == {1}
        assert fresh[0].weights == 1 and state == "live"
    run_virtual(main())
    records = load_timeline(timeline)
    changes = [(r["old"], r["new"]) for r in records if r["kind"] == "health"]
    assert changes[-4:] == [("dead", "restarting"), ("restarting", "stale"), ("stale", "refitting"),
                            ("refitting", "live")]
    assert changes[0][0] == "live"  # a failed call made it suspect, or it went dead at once


def test_timelines_from_before_and_after_the_state_machine_both_plot(tmp_path):
    """Before, the live state was recorded as "healthy"; both read as live (not shaded, not "at t")."""
    from rollout_plugin.viz.timeline_plot import _LIVE

    for live in ("healthy", "live"):
        records = [{"kind": "meta", "engines": ["e0"]}]
        records += [{"kind": "sample", "t": float(t), "engine": "e0", "inflight": 4, "cap": 8} for t in range(30)]
        records += [{"kind": "health", "t": 5.0, "engine": "e0", "old": live, "new": "dead", "reason": "killed"},
                    {"kind": "health", "t": 9.0, "engine": "e0", "old": "dead", "new": live, "reason": "back"}]
        assert plot_timeline(records, tmp_path / f"{live}.png").stat().st_size > 1000
        assert live in _LIVE


def test_a_stale_engine_under_pushed_weights_waits_for_the_next_sync_then_serves():
    """TRL's NCCL transport: the trainer broadcasts to every engine at each sync; no source to refit from now."""
    async def main():
        fresh: list = []
        pool, first = one_engine_pool(fresh, timeouts=TimeoutConfig(hopeless_s=10.0))
        async with pool:
            pool.expect_weight_pushes("the trainer's NCCL broadcast")
            await load_without_a_source(pool, 1)
            first.dead = True
            waiting = asyncio.ensure_future(pool.generate(requests(2)))
            await asyncio.sleep(60)  # well past hopeless_s: the pool waits for the sync, it does not fail
            assert not waiting.done() and pool.stats().engines[0].state == "stale"
            async with pool.weight_update(2):  # the next sync: its load reaches every engine, stale ones too
                await pool.engine_rpc("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "w2"}})
            assert await pool.rejoin_after_push() == ["e0"]
            results = await asyncio.wait_for(waiting, timeout=60)
        assert all(r.ok and r.weight_version == 2 for r in results)
        assert {t // 1000 for r in results for s in r.samples for t in s.token_ids} == {2}
    run_virtual(main())
