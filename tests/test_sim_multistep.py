"""A whole RL run in the simulator: steps, training, weight updates through the pool's real path, the books."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from rollout_plugin.sim.client import OUTPUT_KEY, PROMPT_KEY, SimEngineClient
from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.engine import SimEngine
from rollout_plugin.sim.loop import run_virtual
from rollout_plugin.sim.profile import EngineProfile, StepModel, load_profile
from rollout_plugin.sim.runner import simulate
from rollout_plugin.types import Request, SamplingParams

STEP = StepModel(base_s=0.01, per_seq_s=0.001, per_ctx_token_s=0.0, per_prefill_token_s=0.0)
PROFILE = EngineProfile("test", STEP, kv_tokens=100_000, max_num_seqs=64, max_num_batched_tokens=8192,
                        weight_bytes=16e9, weight_transfer_bytes_per_s=8e9)


def _cfg(steps: int = 3, **workload) -> SimulateConfig:
    cfg = SimulateConfig()
    cfg.workload = replace(cfg.workload, prompts_per_engine=8, output_tokens_median=200, output_tokens_sigma=1.0,
                           max_tokens=2048, steps=steps, train_s=5.0, **workload)
    cfg.fleet = replace(cfg.fleet, max_model_len=4096)
    return cfg


def _check_books(r, bound: int) -> None:
    assert r.steps == 3
    assert r.useful_tokens + r.wasted_tokens == r.output_tokens  # every generated token is trained or wasted
    assert r.useful_tokens > 0 and r.wasted_tokens >= 0
    assert 0 <= r.max_staleness_seen <= bound
    assert r.useful_tokens_per_s == pytest.approx(r.useful_tokens / r.makespan_s)
    assert 0 < r.engine_busy <= 1
    assert len(r.step_wait_s) == 3


@pytest.mark.parametrize("policy", [Policy.static, Policy.verl])
def test_sync_baselines_train_everything_at_staleness_zero(policy):
    cfg = _cfg()
    r = simulate(policy, 4, PROFILE, cfg)
    _check_books(r, 0)
    assert r.wasted_tokens == 0 and r.max_staleness_seen == 0
    one = simulate(policy, 4, PROFILE, replace(cfg, workload=replace(cfg.workload, steps=1)))
    # Three steps: three generations, three trainings, two weight loads (2 s each) — nothing overlaps.
    assert r.makespan_s == pytest.approx(sum(r.step_wait_s) + 3 * 5.0 + 2 * 2.0)
    assert r.step_wait_s[0] == pytest.approx(one.makespan_s)  # its first step is the single-step run
    assert r.useful_tokens == r.output_tokens


@pytest.mark.parametrize("mode", ["continue", "keep"])
def test_pool_run_books_balance_within_the_staleness_bound(mode):
    cfg = _cfg(update_mode=mode)
    r = simulate(Policy.pool, 4, PROFILE, cfg)
    _check_books(r, 1)
    sync = simulate(Policy.static, 4, PROFILE, cfg)
    assert r.useful_tokens <= sync.useful_tokens  # the same groups: what the pool trained, sync trained too
    assert r.failed == 0


def test_pool_run_overlaps_generation_with_training():
    """While the trainer trains, the fleet generates the next step's groups: the trainer waits less from step 2 on."""
    cfg = _cfg()
    r = simulate(Policy.pool, 4, PROFILE, cfg)
    sync = simulate(Policy.static, 4, PROFILE, cfg)
    assert sum(r.step_wait_s[1:]) < sum(sync.step_wait_s[1:])


def test_single_step_runs_report_the_run_figures_trivially():
    cfg = _cfg(steps=1)
    r = simulate(Policy.pool, 4, PROFILE, cfg)
    assert r.steps == 1 and r.wasted_tokens == 0 and r.max_staleness_seen == 0
    assert r.useful_tokens == r.output_tokens
    assert r.mean_trained_output_tokens == pytest.approx(r.output_tokens / r.samples)


def test_the_h100_profile_prices_a_weight_update_from_its_bytes_and_bandwidth():
    p = load_profile("h100_llama8b")
    assert p.weight_bytes == 16e9
    assert 1.0 < p.weight_load_s < 3.0


# -- the simulated engine's pause / abort / keep, as vLLM's /pause answers ---------------------------
def _req(rid: str, prompt: int, outs: tuple[int, ...]) -> Request:
    return Request(rid, rid, n=len(outs), sampling=SamplingParams(max_tokens=4096),
                   metadata={PROMPT_KEY: prompt, OUTPUT_KEY: outs})


def test_pause_abort_answers_with_the_tokens_so_far_and_a_continuation_runs_to_the_same_length():
    async def main():
        groups: dict = {}
        client = SimEngineClient(SimEngine("e", PROFILE), groups)
        task = asyncio.ensure_future(client.generate([_req("g", 64, (10, 100, 1000))]))
        await asyncio.sleep(0.5)  # ~35 steps of 3 sequences
        await client.admin("/pause?mode=abort")
        (gen,) = await task
        first, second, third = gen.samples
        assert first.finish_reason == "length" and first.output_tokens == 10
        assert second.finish_reason == "abort" and 0 < second.output_tokens < 100
        assert third.finish_reason == "abort" and third.output_tokens == second.output_tokens
        assert gen.prompt_ids is not None and len(gen.prompt_ids) == 64
        # The pool continues a cut sample as prompt + its tokens (ledger.Unit.request): it runs to its length.
        cont = Request("g", [*gen.prompt_ids, *second.token_ids], n=1, sampling=SamplingParams(max_tokens=4096),
                       metadata={PROMPT_KEY: 64, OUTPUT_KEY: (10, 100, 1000)})
        await client.admin("/resume")
        (rest,) = await client.generate([cont])
        assert second.output_tokens + rest.samples[0].output_tokens == 100
        return client.engine

    engine = run_virtual(main())
    assert engine.preemptions == 0


def test_a_sample_aborted_before_its_first_token_is_generated_again_from_its_group_bag():
    async def main():
        big = replace(PROFILE, max_num_seqs=2)
        groups: dict = {}
        client = SimEngineClient(SimEngine("e", big), groups)
        task = asyncio.ensure_future(client.generate([_req("g", 8, (50, 50, 7))]))
        await asyncio.sleep(0.1)
        await client.admin("/pause?mode=abort")
        (gen,) = await task
        assert [s.output_tokens for s in gen.samples][2] == 0  # the third never ran (two slots)
        assert groups["g"] == [7]
        await client.admin("/resume")
        piece = Request("g", "g", n=1, sampling=SamplingParams(max_tokens=4096),
                        metadata={PROMPT_KEY: 8, OUTPUT_KEY: (50, 50, 7)})
        (again,) = await client.generate([piece])
        return again.samples[0].output_tokens, groups["g"]

    assert run_virtual(main()) == (7, [])


def test_keep_freezes_sequences_and_a_weight_load_makes_them_prefill_again():
    async def main():
        engine = SimEngine("e", replace(PROFILE, step=replace(STEP, per_prefill_token_s=1e-4)))
        client = SimEngineClient(engine)
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(client.generate([_req("g", 800, (200, 200))]))
        await asyncio.sleep(0.5)
        await client.admin("/pause?mode=keep")
        made, paused_at = engine.generation_tokens, loop.time()
        await asyncio.sleep(10.0)
        assert engine.generation_tokens == made  # frozen: nothing steps while paused
        await client.admin("/collective_rpc", {"method": "reload_weights"})
        assert loop.time() - paused_at == pytest.approx(10.0 + 2.0)  # 16 GB at 8 GB/s
        await client.admin("/reset_prefix_cache")
        await client.admin("/resume")
        (gen,) = await task
        assert [s.output_tokens for s in gen.samples] == [200, 200]
        return engine

    engine = run_virtual(main())
    assert engine.recomputed_tokens > 800  # prompt and tokens so far, prefilled again under the new weights
    assert engine.preemptions == 0  # not the scheduler's preemption: the monitor must not read it as KV pressure


def test_simulate_cli_writes_the_run_figures(tmp_path, capsys):
    from rollout_plugin.cli.simulate import run

    out = tmp_path / "run.json"
    assert run(["fleet.engines=[4]", "policies=[pool,static]", "workload.prompts_per_engine=4",
                "workload.steps=3", "workload.train_s=5", "workload.max_tokens=1024", f"output={out}"]) == 0
    rows = json.loads(out.read_text())["runs"]
    assert {r["policy"] for r in rows} == {"pool", "static"}
    for r in rows:
        assert r["useful_tokens"] + r["wasted_tokens"] == r["output_tokens"]
        assert {"useful_tokens_per_s", "max_staleness_seen", "mean_trained_output_tokens", "engine_busy"} <= set(r)
    assert "useful tok/s" in capsys.readouterr().out


def test_simulate_cli_refuses_a_multi_turn_multi_step_run(capsys):
    from rollout_plugin.cli.simulate import run
    from rollout_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="workload.turns"):
        run(["fleet.engines=[4]", "workload.steps=3", "workload.turns=2", "workload.update_mode=freeze"])


# -- pool.steps: in flight relative to the step, staleness-aware submission --------------------------
def test_steps_submit_no_group_a_step_could_not_take_within_the_staleness_bound():
    from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig
    from rollout_plugin.pool.api.pool import RolloutPool

    async def main():
        loop = asyncio.get_running_loop()
        clients = [SimEngineClient(SimEngine(f"e{i}", PROFILE)) for i in range(2)]
        reqs = [_req(f"g{i}", 16, (20, 20, 20, 20)) for i in range(40)]
        async with RolloutPool(EngineConfig(max_model_len=4096, max_num_seqs=64), PoolConfig(k=4),
                               ControllerConfig(), clients=clients, clock=loop.time) as pool:
            async with pool.steps(reqs, max_staleness=1) as st:
                await st.next(5)
                assert st.in_flight == 10  # unset: 2 × the step
                await asyncio.sleep(100.0)  # all of it finishes; a fleet faster than the trainer then waits
                assert st.submitted == 10
                await st.next(5)
                assert st.submitted == 15  # after 1 step: (1 + 1 + 1) steps' groups
                await asyncio.sleep(100.0)
                for _ in range(2):
                    async with pool.weight_update():
                        pass
                third = await st.next(5)  # what finished under version 0 is 2 versions old now
                return len(st.dropped), {r.weight_version for r in third}, st.submitted

    dropped, versions, submitted = run_virtual(main())
    assert dropped == 5 and versions == {2}
    assert submitted == 4 * 5 + dropped  # the dropped groups' places go to new ones


def test_the_trainer_adapters_in_flight_follows_the_step():
    from rollout_plugin.adapters.trl.config import AsyncRolloutConfig, resolved_in_flight
    from rollout_plugin.errors import ConfigError

    assert resolved_in_flight(AsyncRolloutConfig(groups_per_step=2048)) == 4096  # 64 engines × 32 prompts
    assert resolved_in_flight(AsyncRolloutConfig(in_flight=16, groups_per_step=2048)) == 16
    with pytest.raises(ConfigError, match="groups_per_step"):
        resolved_in_flight(AsyncRolloutConfig())


def test_a_cut_streamed_call_reports_the_tokens_a_stream_would_have_delivered():
    from rollout_plugin.pool.core.engine_client import new_progress

    async def main():
        groups: dict = {}
        client = SimEngineClient(SimEngine("e", replace(PROFILE, max_num_seqs=2)), groups, stream_min_tokens=1024)
        req = _req("g", 32, (20, 300, 9000))  # max_tokens 4096: long enough to stream
        progress = new_progress([req])
        task = asyncio.ensure_future(client.generate([req], progress))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return progress[0], groups

    (first, second, third), groups = run_virtual(main())
    assert not groups.get("g")  # every sample had tokens: nothing is generated afresh
    assert first.finish_reason == "length" and len(first.token_ids) == 20
    assert second.finish_reason is None and 0 < len(second.token_ids) < 300 and second.token_ids[0] == 300
    assert len(second.prompt_token_ids) == 32  # prompt + tokens: the continuation's prompt, its length first
    assert third.finish_reason is None and 0 < len(third.token_ids) < len(second.token_ids)  # admitted later


def test_an_unstreamed_call_is_blind_as_the_http_clients_are_by_default():
    from rollout_plugin.pool.core.engine_client import new_progress

    async def main():
        client = SimEngineClient(SimEngine("e", PROFILE))  # pool.stream_min_tokens unset: nothing streams
        req = _req("g", 32, (20, 300))
        progress = new_progress([req])
        task = asyncio.ensure_future(client.generate([req], progress))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return progress[0]

    parts = run_virtual(main())
    assert all(p.blind and not p.token_ids for p in parts)  # a cut sample starts over, as over HTTP
