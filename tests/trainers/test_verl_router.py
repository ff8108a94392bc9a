"""Our router as verl uses it: pure admission policy, the router's queue, then verl's own load-balancer path.

- policy and queue: in-process, no Ray (fast);
- verl's path: ``get_router_handle`` builds our actor from a router YAML, verl's ``LLMServerClient`` /
  ``FullyAsyncLLMServerClient`` acquire, call ``server.generate`` and release (local Ray on CPU);
- real generations: a small Ray actor with verl's server ``generate`` shape in front of a real vLLM CPU
  engine (started from the main venv, which has vllm) — the router scrapes that engine's /metrics.

    .venv-trainers/bin/python -m pytest tests/trainers/test_verl_router.py -q
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from rollout_plugin.adapters.verl.admission import server_cap
from rollout_plugin.adapters.verl.router import NO_SERVER, PoolRouter, parse_settings
from rollout_plugin.errors import ConfigError

MAIN_PYTHON = Path(__file__).parents[2] / ".venv" / "bin" / "python"


# --- the policy (where a request goes is the pool's pick_near: tests/test_routing.py) -----------------
def test_server_cap_is_xtuners_cap_times_the_ratio():
    assert server_cap(max_num_seqs=256, max_model_len=4096, group_size=8, servers=4, ratio=1.2) == 308
    assert server_cap(max_num_seqs=None, max_model_len=20000, group_size=8, servers=4, ratio=1.0) == 128
    assert server_cap(max_num_seqs=4, max_model_len=1024, group_size=16, servers=1, ratio=1.0) == 16


def test_settings_report_every_bad_key_with_the_nearest():
    with pytest.raises(ConfigError) as info:
        parse_settings({"imbalanse": 0.3, "controller": {"intervl_s": 1.0}, "admission_timeout_s": -1})
    text = str(info.value)
    assert "router.imbalanse=0.3: unknown router setting (try router.imbalance)" in text
    assert "router.controller.intervl_s=1.0: unknown controller setting (try router.controller.interval_s)" in text
    assert "router.admission_timeout_s=-1: must be >= 0.001" in text
    merged = parse_settings({"imbalance": 0.3, "controller": {"mode": "off"}}, {"imbalance": 0.5})
    assert merged.imbalance == 0.5 and merged.controller.mode.value == "off"


# --- the router's queue, in process ---------------------------------------------------------------
class _Remote:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class FakeHandle:
    """Stands in for a verl server handle where only ``get_rollout_config`` is called."""

    def __init__(self, **config: Any):
        self.get_rollout_config = _Remote(lambda: config)


def _router(servers: int = 2, *, max_num_seqs: int = 4, n: int = 1, **settings: Any) -> PoolRouter:
    handles = {f"s{i}": FakeHandle(max_num_seqs=max_num_seqs, n=n, max_model_len=1024) for i in range(servers)}
    return PoolRouter(handles, {"router_class": "x", "over_concurrency_ratio": 1.0,
                                "controller": {"mode": "off"}, **settings})


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Yield to the loop until ``predicate`` holds (a condition wait with a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0)


def test_caps_hold_and_waiters_are_admitted_in_arrival_order():
    async def main() -> None:
        router = _router(2, max_num_seqs=4)
        admitted: list[str] = []
        tasks = {}
        for i in range(20):
            rid = f"r{i}"
            tasks[rid] = asyncio.create_task(router.acquire_server(rid, prompt_ids=[i]))
            tasks[rid].add_done_callback(lambda t, rid=rid: admitted.append(rid))
        await _until(lambda: len(admitted) == 8 and router._pool is not None and router._pool.queued == 12)
        status = await router.get_status()
        assert status["servers"] == {"s0": 4, "s1": 4} and status["caps"] == {"s0": 4, "s1": 4}
        assert status["waiting"] == 12
        while len(admitted) < 20:
            rid = admitted[len(admitted) - 8]  # the oldest admission still holding a slot
            server, _ = tasks[rid].result()
            before = len(admitted)
            await router.release_server(server, request_id=rid)
            await _until(lambda: len(admitted) == before + 1)
            status = await router.get_status()
            assert all(status["servers"][s] <= status["caps"][s] for s in status["servers"])
        assert admitted == [f"r{i}" for i in range(20)]

    asyncio.run(main())


def test_a_request_past_the_admission_timeout_is_refused_and_holds_no_slot():
    async def main() -> None:
        router = _router(1, max_num_seqs=2, admission_timeout_s=0.05)
        held = [await router.acquire_server(f"r{i}", prompt_ids=[i]) for i in range(2)]
        with pytest.raises(RuntimeError, match=f"^{NO_SERVER}: .*router.admission_timeout_s"):
            await router.acquire_server("late", prompt_ids=[9])
        await router.release_server(held[0][0], request_id="r0")
        status = await router.get_status()
        assert status["total_inflight"] == 1 and status["waiting"] == 0 and status["counters"]["refused"] == 1

    asyncio.run(main())


def test_beyond_max_waiting_acquire_refuses_at_once():
    async def main() -> None:
        router = _router(1, max_num_seqs=1, max_waiting=1)
        await router.acquire_server("r0", prompt_ids=[0])
        waiting = asyncio.create_task(router.acquire_server("r1", prompt_ids=[1]))
        await _until(lambda: router._pool.queued == 1)
        with pytest.raises(RuntimeError, match="router.max_waiting=1"):
            await router.acquire_server("r2", prompt_ids=[2])
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await router.release_server("s0", request_id="r0")
        assert await router.get_total_inflight() == 0  # the cancelled waiter took nothing

    asyncio.run(main())


def test_groups_stay_together_and_sessions_stick_until_their_server_is_full():
    async def main() -> None:
        router = _router(2, max_num_seqs=8, n=4)
        homes = {}
        for group in range(4):  # groups arrive one after another, as verl's workers send them
            got = [await router.acquire_server(uuid.uuid4().hex, prompt_ids=[group] * 5) for _ in range(4)]
            homes[group] = {server for server, _ in got}
        assert all(len(servers) == 1 for servers in homes.values()), homes
        assert {next(iter(s)) for s in homes.values()} == {"s0", "s1"}
        assert (await router.get_status())["counters"]["group split"] == 0

        sessions = _router(2, max_num_seqs=2)
        first, _ = await sessions.acquire_server("session", prompt_ids=[1, 2])
        await sessions.release_server(first, request_id="session")
        again, _ = await sessions.acquire_server("session", prompt_ids=[1, 2, 3, 4])  # the next turn
        assert (first, again) == ("s0", "s0")
        assert (await sessions.acquire_server("a", prompt_ids=[7]))[0] == "s1"
        assert (await sessions.acquire_server("b", prompt_ids=[8]))[0] == "s0"
        await sessions.release_server("s0", request_id="session")
        assert (await sessions.acquire_server("c", prompt_ids=[9]))[0] == "s0"  # s0 full again
        moved, _ = await sessions.acquire_server("session", prompt_ids=[1, 2, 3, 4, 5, 6])  # turn 3
        assert moved == "s1" and (await sessions.get_status())["counters"]["group split"] == 1

    asyncio.run(main())


def test_clear_sticky_cache_clears_the_one_session_map_the_pool_routes_by():
    """verl clears the sticky cache to rebalance: the session's next turn then goes where load says. The router
    keeps no copy of its own, so nothing is left behind that still pins the session (issue 23)."""
    async def main() -> None:
        router = _router(2, max_num_seqs=4, cache_size=100, cache_ttl_s=60.0)
        first, _ = await router.acquire_server("session", prompt_ids=[1, 2])
        await router.release_server(first, request_id="session")
        other, _ = await router.acquire_server("x", prompt_ids=[7])  # held: s0 one ahead (the gate stays shut)
        sticky, _ = await router.acquire_server("session", prompt_ids=[1, 2, 3])
        await router.release_server(sticky, request_id="session")
        assert (first, other, sticky) == ("s0", "s0", "s0")
        cleared = await router.clear_sticky_cache()
        assert cleared == {"cleared_entries": 5, "server_loads": {"s0": 1, "s1": 0}}  # 2 sessions, 3 prompts
        assert router._pool.affinity_keys == 0
        assert (await router.acquire_server("session", prompt_ids=[1, 2, 3, 4]))[0] == "s1"
        assert (router._pool.pool_cfg.affinity_max_keys, router._pool.pool_cfg.affinity_ttl_s) == (100, 60.0)
        await router.close()

    asyncio.run(main())
    with pytest.raises(ConfigError, match=r"router.cache_size=0: must be >= 1.*router.cache_ttl_s=0: must be > 0 s"):
        parse_settings({"cache_ttl_s": 0, "cache_size": 0})


def _metrics(preemptions: float, tokens: float, kv: float = 0.1, waiting: float = 0) -> str:
    return ("# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
            "# TYPE vllm:num_preemptions counter\n"
            f'vllm:num_preemptions_total{{model_name="m"}} {preemptions}\n'
            "# TYPE vllm:generation_tokens counter\n"
            f'vllm:generation_tokens_total{{model_name="m"}} {tokens}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}\n')


def test_the_pools_controller_cuts_a_cap_on_preemptions_and_admission_follows():
    async def main() -> None:
        router = _router(1, max_num_seqs=10, controller={"mode": "adaptive", "interval_s": 60.0, "max_cap": 10})
        held = [await router.acquire_server(f"r{i}", prompt_ids=[i]) for i in range(10)]
        assert len(held) == 10 and (await router.get_status())["caps"]["s0"] == 10
        # A cap's worth waits (less would fit under the cap: a cut would only stretch the tail).
        late = [asyncio.create_task(router.acquire_server(f"w{i}", prompt_ids=[100 + i])) for i in range(10)]
        await _until(lambda: router._pool.queued == 10)
        t0 = time.monotonic()  # after the monitor's own first look (the pool's clock)
        router.observe({"s0": _metrics(0, 100, waiting=2)}, now=t0 + 1.0)
        router.observe({"s0": _metrics(3, 200, waiting=2)}, now=t0 + 2.0)  # preempting while work waits: a cut
        status = await router.get_status()
        assert status["caps"]["s0"] == 7 and status["counters"]["cap changes"] == 1
        for i in range(3):
            await router.release_server("s0", request_id=f"r{i}")
        assert router._pool.queued == 10 and not any(t.done() for t in late)  # 7 in flight = the new cap
        await router.release_server("s0", request_id="r3")
        done, _ = await asyncio.wait(late, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and done.pop().result()[0] == "s0"
        for t in late:
            t.cancel()
        await router.close()

    asyncio.run(main())


# --- verl's own load-balancer path, local Ray on CPU ----------------------------------------------
@dataclass
class FakeTokenOutput:
    """What verl's client reads of a server's ``TokenOutput`` (verl's own is a pydantic model)."""

    token_ids: list
    log_probs: Optional[list] = None
    routed_experts: Any = None
    stop_reason: Optional[str] = "completed"
    num_preempted: Optional[int] = 0
    extra_fields: dict = field(default_factory=dict)


class FakeServer:
    """verl's server actor shape: ``get_rollout_config`` and ``generate``, with a fixed decode time."""

    def __init__(self, name: str, config: dict, decode_s: float):
        self.name, self.config, self.decode_s = name, config, decode_s
        self.now = self.peak = 0

    def get_rollout_config(self) -> dict:
        return self.config

    async def generate(self, prompt_ids, sampling_params, request_id, **_: Any) -> FakeTokenOutput:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.decode_s)  # simulated decode time (what the cap is measured against)
        finally:
            self.now -= 1
        return FakeTokenOutput(token_ids=list(prompt_ids[:3]), extra_fields={"server": self.name})

    def stats(self) -> dict:
        return {"peak": self.peak, "now": self.now}


class HttpServer:
    """verl's server ``generate`` shape in front of a real vLLM engine (token ids in, token ids out)."""

    def __init__(self, url: str, api_key: str, model: str, config: dict):
        self.url, self.api_key, self.model, self.config = url, api_key, model, config
        self.now = self.peak = 0

    def get_rollout_config(self) -> dict:
        return self.config

    async def generate(self, prompt_ids, sampling_params, request_id, **_: Any) -> FakeTokenOutput:
        import httpx

        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            async with httpx.AsyncClient(timeout=300) as http:
                response = await http.post(f"{self.url}/v1/completions", headers={"Authorization": f"Bearer {self.api_key}"},
                                           json={"model": self.model, "prompt": list(prompt_ids), "max_tokens": 16,
                                                 "temperature": 1.0, "return_token_ids": True})
                response.raise_for_status()
                body = response.json()
        finally:
            self.now -= 1
        choice = body["choices"][0]
        return FakeTokenOutput(token_ids=choice.get("token_ids") or [],
                               extra_fields={"completion_tokens": body["usage"]["completion_tokens"],
                                             "text": choice["text"]})

    def stats(self) -> dict:
        return {"peak": self.peak}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("verl.workers.rollout.llm_server", reason="verl's rollout client (needs fastapi, uvicorn, "
                        "cachetools: bash scripts/trainer_venv.sh)")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test classes travel by value
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _status_when(ray_mod: Any, lb: Any, predicate: Callable[[dict], bool], timeout_s: float = 60.0) -> dict:
    """The router's status once ``predicate`` holds (polled: it lives in another process)."""
    deadline = time.monotonic() + timeout_s
    while not predicate(status := ray_mod.get(lb.get_status.remote())):
        assert time.monotonic() < deadline, f"router status never reached the condition: {status}"
        time.sleep(0.05)  # polling another process's state; nothing to wait on instead
    return status


def _router_yaml(tmp_path: Path, **settings: Any) -> str:
    from omegaconf import OmegaConf

    path = tmp_path / "router.yaml"
    OmegaConf.save({"router_class": "rollout_plugin.adapters.verl.actor.RolloutPoolRouter", **settings}, path)
    return str(path)


def _client_config():
    from omegaconf import OmegaConf

    return OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "vllm", "full_determinism": False}}})


def test_router_in_verls_load_balancer_path(ray_local, tmp_path):
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    server_cls = ray_local.remote(FakeServer)
    servers = {f"s{i}": server_cls.remote(f"s{i}", {"max_num_seqs": 8, "n": 4, "max_model_len": 1024}, 0.5)
               for i in range(2)}
    lb = get_router_handle(servers, router_config_path=_router_yaml(tmp_path, over_concurrency_ratio=1.0,
                                                                     controller={"mode": "off"}))
    client = LLMServerClient(config=_client_config(), load_balancer_handle=lb)

    async def main() -> list:
        calls = []
        for group in range(6):  # 24 samples for 16 slots; each group's 4 are sent once the last group is in
            calls += [asyncio.ensure_future(client.generate(uuid.uuid4().hex, prompt_ids=[group] * 8,
                                                            sampling_params={})) for _ in range(4)]
            want = min(16, 4 * (group + 1))
            deadline = time.monotonic() + 60
            while (await lb.get_status.remote())["total_inflight"] + sum(c.done() for c in calls) < want:
                assert time.monotonic() < deadline, "admissions did not happen"
                await asyncio.sleep(0.02)  # polling another process's state; nothing to await instead
        return await asyncio.gather(*calls)

    outputs = asyncio.run(main())
    assert len(outputs) == 24
    by_group: dict[int, set] = {}
    for i, out in enumerate(outputs):
        by_group.setdefault(i // 4, set()).add(out.extra_fields["server"])
    status = _status_when(ray_local, lb, lambda s: s["total_inflight"] == 0)  # verl releases fire-and-forget
    peaks = {sid: ray_local.get(h.stats.remote())["peak"] for sid, h in servers.items()}
    assert all(peak <= status["caps"][sid] == 8 for sid, peak in peaks.items()), (peaks, status)
    assert max(peaks.values()) == 8  # the caps were reached: the limit, not the load, bounded them
    assert status["counters"]["admitted"] == 24
    # The first four groups went in group by group: each stayed on one server.
    assert all(len(by_group[g]) == 1 for g in range(4)), by_group
    assert status["counters"]["waited"] > 0


def test_a_refusal_fails_verls_plain_client_and_is_retried_by_its_fully_async_client(ray_local, tmp_path):
    """verl 0.9.1: LLMServerClient does not retry a failed acquire; FullyAsyncLLMServerClient (only_hybrid)
    retries "No available servers in load balancer" every second — our refusal's message."""
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    server = ray_local.remote(FakeServer).remote("s0", {"max_num_seqs": 1, "n": 1, "max_model_len": 1024}, 1.5)
    lb = get_router_handle({"s0": server}, router_config_path=_router_yaml(
        tmp_path, over_concurrency_ratio=1.0, admission_timeout_s=0.3, controller={"mode": "off"}))

    async def two(client) -> list:
        return await asyncio.gather(*(client.generate(uuid.uuid4().hex, prompt_ids=[i, i], sampling_params={})
                                      for i in range(2)), return_exceptions=True)

    plain = asyncio.run(two(LLMServerClient(config=_client_config(), load_balancer_handle=lb)))
    errors = [r for r in plain if isinstance(r, Exception)]
    assert len(errors) == 1 and NO_SERVER in str(errors[0]), plain
    retried = asyncio.run(two(FullyAsyncLLMServerClient(config=_client_config(), load_balancer_handle=lb,
                                                        only_hybrid=True)))
    assert not [r for r in retried if isinstance(r, Exception)], retried
    assert ray_local.get(server.stats.remote())["peak"] == 1
    assert _status_when(ray_local, lb, lambda s: s["total_inflight"] == 0)["counters"]["refused"] >= 2


@pytest.mark.engine
def test_real_generations_flow_through_the_router(ray_local, tmp_path):
    if not MAIN_PYTHON.exists():
        pytest.skip(f"the main venv with vllm ({MAIN_PYTHON}) is absent: run `make install`")
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    from rollout_plugin.config.schema import EngineConfig
    from rollout_plugin.model.embedded import resolve_model
    from rollout_plugin.pool.engines.launcher import EngineProcess, reserve_ports

    model = resolve_model("embedded:tiny-llama", python=str(MAIN_PYTHON))
    cfg = EngineConfig(model=model, python=str(MAIN_PYTHON), max_model_len=512, cpu_kvcache_gb=1,
                       log_dir=str(tmp_path / "logs"))
    (port,) = reserve_ports(cfg.host, 0, 1)
    engine = EngineProcess(0, cfg, model=model, port=port, max_num_seqs=8, cpu_bind=None, log_dir=tmp_path / "logs")
    engine.start()
    try:
        asyncio.run(engine.wait_ready(timeout_s=600))
        sid = f"{cfg.host}:{port}"  # verl's server ids are host:port: the router scrapes http://<id>/metrics
        server = ray_local.remote(HttpServer).remote(engine.url, engine.api_key, model,
                                                     {"max_num_seqs": 4, "n": 4, "max_model_len": 512})
        lb = get_router_handle({sid: server}, router_config_path=_router_yaml(
            tmp_path, over_concurrency_ratio=1.0, controller={"mode": "adaptive", "interval_s": 0.2, "max_cap": 4}))
        client = LLMServerClient(config=_client_config(), load_balancer_handle=lb)

        async def main() -> list:
            return await asyncio.gather(*(client.generate(uuid.uuid4().hex, prompt_ids=[1, 100 + g, 200 + g, 300],
                                                          sampling_params={}) for g in range(4) for _ in range(4)))

        outputs = asyncio.run(main())
        assert len(outputs) == 16 and all(o.extra_fields["completion_tokens"] > 0 for o in outputs)
        assert ray_local.get(server.stats.remote())["peak"] <= 4
        # The monitor read the engine's /metrics and stepped the pool's controller; every release arrived.
        status = _status_when(ray_local, lb, lambda s: s["counters"]["observed"] > 0 and s["total_inflight"] == 0)
        assert status["counters"]["admitted"] == 16
    finally:
        engine.stop()


def test_the_router_refuses_to_start_without_the_servers_rollout_config():
    def broken():
        raise RuntimeError("actor died")

    class NoConfig:
        get_rollout_config = _Remote(broken)

    router = PoolRouter({"s0": NoConfig()}, {"controller": {"mode": "off"}})
    with pytest.raises(RuntimeError, match=r"server s0 gave no rollout config .*will not guess"):
        asyncio.run(router.acquire_server("r", prompt_ids=[1]))
