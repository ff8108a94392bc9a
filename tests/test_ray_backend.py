"""``pool.backend=ray`` on a real two-node Ray cluster on this machine: `collect` across both nodes, one
node stopped mid-run, every sample written exactly once, nothing left running afterwards.

Each "node" is a ``ray start --block`` in its own session with a marker resource (node_a, node_b);
stopping node B SIGKILLs its whole session (raylet, agents, the engine's actor worker), as a lost
machine would, and the actor's vLLM server (its own session) must go with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout_plugin.config.schema import CollectConfig, PoolBackend, RayConfig, RayPlacement
from rollout_plugin.config.validate import validate_collect
from rollout_plugin.errors import ConfigError
from rollout_plugin.pool.engines.ray_backend import NODE_AFFINITY_UNIT, replica_bundle, spread_target

RAY = Path(sys.executable).with_name("ray")
CLI = [sys.executable, "-m", "rollout_plugin.cli.main", "collect"]
MARK = "ROLLOUT_PLUGIN_RAY_TEST"  # in the environment of every process our nodes start (vLLM included)


# -- pure parts -----------------------------------------------------------------------------------
def test_bundle_holds_cpus_gpus_and_node_affinity():
    cfg = RayConfig(num_cpus=2, resources={"rollout": 1}, nodes=["node_a", "node_b"])
    assert replica_bundle(cfg, 0, 4) == {"CPU": 2, "rollout": 1, "GPU": 4, "node_a": NODE_AFFINITY_UNIT}
    assert replica_bundle(cfg, 3, 0) == {"CPU": 2, "rollout": 1, "node_b": NODE_AFFINITY_UNIT}
    assert replica_bundle(RayConfig(num_cpus=0), 0, 0) == {}


def test_spread_picks_the_fitting_node_with_fewest_of_ours():
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 8, "GPU": 8}},
             {"NodeID": "b", "Alive": True, "Resources": {"CPU": 8, "GPU": 8}},
             {"NodeID": "c", "Alive": False, "Resources": {"CPU": 8, "GPU": 8}},
             {"NodeID": "d", "Alive": True, "Resources": {"CPU": 8}}]
    bundle = {"CPU": 1, "GPU": 2}
    assert spread_target(bundle, nodes, {"a": 2, "b": 1}) == "b"
    assert spread_target(bundle, nodes, {"a": 1, "b": 1}) == "a"  # a tie goes to the lower id: deterministic
    assert spread_target({"CPU": 1, "GPU": 16}, nodes, {}) is None  # nothing fits: leave it to Ray


def test_ray_settings_are_checked_together():
    cfg = CollectConfig()
    cfg.pool.backend = PoolBackend.ray
    cfg.engine.urls = ["http://127.0.0.1:8000"]
    cfg.pool.ray = RayConfig(max_concurrency=1, nodes=["GPU"], resources={"x": 0}, placement=RayPlacement.spread)
    with pytest.raises(ConfigError) as info:
        validate_collect(cfg)
    keys = [p.key for p in info.value.problems]
    assert keys == ["pool.ray.max_concurrency", "pool.ray.resources.x", "pool.ray.nodes", "pool.backend"]


def test_pool_ray_group_selects_the_backend():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from rollout_plugin.config.schema import register_configs

    register_configs()
    with initialize_config_module("rollout_plugin.hydra_conf", version_base=None):
        cfg = OmegaConf.to_object(compose("collect", overrides=["pool=ray", "pool.engines=3"]))
    validate_collect(cfg)
    assert (cfg.pool.backend, cfg.pool.ray.address, cfg.pool.ray.placement) == (PoolBackend.ray, "auto",
                                                                                 RayPlacement.spread)
    assert cfg.pool.engines == 3 and cfg.pool.over_concurrency_ratio == 1.2  # the rest as pool=default


# -- a real two-node cluster ----------------------------------------------------------------------
def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, taken: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct free ports, none in ``taken``: all bound at once while picked (one at a time, the OS may
    hand back the port it just freed — CI saw a node refuse to start with two of its components on 39099)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)  # kept bound, taken or not, so that it is not offered again
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in taken:
                ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)  # polling other processes' state; there is no event to wait on


def _stat(proc: Path) -> list[str]:
    """/proc/<pid>/stat fields after the command name: [state, ppid, pgid, session, ...]."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()


def session_pids(sid: int) -> list[int]:
    """Live processes of one session: a Ray node's raylet, agents and workers (each worker leads its own group)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = _stat(proc)
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(proc.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def marked_pids(mark: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``mark``: our Ray nodes and their engines."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0") and _stat(proc)[0] != "Z":
                pids.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return pids


class LocalRayCluster:
    """A head node and worker nodes, each a ``ray start --block`` session with one marker resource."""

    def __init__(self) -> None:
        self.mark = uuid.uuid4().hex
        self.temp = tempfile.mkdtemp(prefix="rp-ray-")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.used = {self.port}  # ports handed to this cluster's nodes: never twice
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()
        self.retired: list[subprocess.Popen[bytes]] = []  # killed nodes whose marker a new node took over

    def start_node(self, resource: str) -> None:
        head = not self.nodes
        if resource in self.nodes:
            self.retired.append(self.nodes.pop(resource))
            self.killed.discard(resource)
        ports = free_ports(6, taken=self.used)  # distinct within the node and across the cluster's nodes
        self.used.update(ports)
        cmd = [str(RAY), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               "--num-cpus=1", "--num-gpus=0", f"--resources={json.dumps({resource: 1})}",
               "--object-store-memory=100000000",  # Ray's floor is ~75 MB; we only pass endpoints
               f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
               f"--runtime-env-agent-port={ports[2]}", f"--metrics-export-port={ports[3]}"]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                    f"--ray-client-server-port={ports[4]}", f"--dashboard-port={ports[5]}"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(Path(self.temp) / f"{resource}.log", "wb")
        env = {**os.environ, MARK: self.mark, "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes[resource] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, cwd=self.temp)
        log.close()
        wait_until(lambda: self._has(resource), 180, f"Ray node {resource} to join")

    def start_node_until(self, resource: str, done, timeout_s: float, what: str, tries: int = 3) -> int:
        """Start a node, then wait for ``done``; returns how many starts it took. On loaded cores Ray's GCS can
        miss a new raylet's heartbeats and mark the node dead (CI saw it: its ``ray start --block`` then exits):
        what we wait for never had a live node to run on, so start the node again, ``tries`` times at most,
        and fail saying so."""
        for attempt in range(1, tries + 1):
            self.start_node(resource)
            proc = self.nodes[resource]
            deadline = time.monotonic() + timeout_s
            while not done():
                if proc.poll() is not None:
                    self.killed.add(resource)  # not the fault under test: _has must not raise on it
                    print(f"Ray node {resource} died (exit {proc.returncode}) before {what}; starting it again")
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
                time.sleep(0.5)  # polling other processes' state; there is no event to wait on
            else:
                return attempt
        raise AssertionError(f"Ray marked node {resource} dead {tries} times before {what}: the machine is too "
                             "loaded for Ray's heartbeats, not a pool failure")

    def _has(self, resource: str) -> bool:
        for name, proc in self.nodes.items():
            if name not in self.killed and proc.poll() is not None:
                tail = (Path(self.temp) / f"{name}.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"ray node {name} exited with {proc.returncode}: {tail}")
        status = subprocess.run([str(RAY), "status", f"--address={self.address}"], capture_output=True,
                                text=True, timeout=60)  # inherits RAY_AUTH_MODE from the fixture
        return f"/1.0 {resource}" in status.stdout

    def kill_node(self, resource: str) -> None:
        """A lost machine: everything in the node's session dies at once, no clean shutdown. The engine's
        vLLM server runs in a session of its own: it has to go with its actor's worker, by itself."""
        proc = self.nodes[resource]
        self.killed.add(resource)
        kill_session(proc.pid)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in [*self.retired, *reversed(list(self.nodes.values()))]:  # workers first, the head (GCS) last
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
            kill_session(proc.pid)  # whatever its session still holds (workers lead groups of their own)
            proc.wait(timeout=30)
        # Anything that escaped the sessions (a server in its own session) is still marked.
        for pid in marked_pids(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_cluster(monkeypatch) -> Iterator[LocalRayCluster]:
    pytest.importorskip("ray", reason="pool.backend=ray needs the ray extra (make test installs it)")
    # Explicit, for the nodes, `ray status` and every driver: otherwise a token some other local
    # cluster left in ~/.ray/auth_token switches some of them to token auth and they can't talk.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = LocalRayCluster()
    try:
        cluster.start_node("node_a")
        cluster.start_node("node_b")
        yield cluster
    finally:
        servers = [p for p in marked_pids(cluster.mark) if b"vllm" in _cmdline(p)]
        cluster.stop()
        shutil.rmtree(cluster.temp, ignore_errors=True)
        # Ray's own processes go with their node's session; the vLLM servers must have gone with the pool.
        assert not marked_pids(cluster.mark), "processes of the test cluster survived its teardown"
        assert not servers, f"vLLM servers outlived the pool that started them: {servers}"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def servers_on_port(port: str) -> list[int]:
    needle = f"--port\0{port}\0".encode()
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if needle in _cmdline(int(p.name))]


def rows_of(path: Path) -> list[dict]:
    """The rows the CLI has finished writing: read mid-run, the file may end in half a line."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


@pytest.mark.engine
@pytest.mark.slow
def test_collect_across_two_ray_nodes_survives_losing_one(ray_cluster, model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    k, prompts = 4, 100
    cmd = [*CLI, "pool.backend=ray", f"pool.ray.address={ray_cluster.address}", "pool.ray.nodes=[node_a,node_b]",
           "pool.ray.replace_timeout_s=20", "pool.ray.node_poll_s=1", "pool.engines=2", f"pool.k={k}",
           # Small caps: work waits in the pool and reaches the engines call by call, so node B is
           # sure to hold some of it when it goes (with the default caps all of it is sent at once).
           "pool.per_engine=16", "pool.pack_size=8", f"limit={prompts}",
           f"engine.model={model_dir}", "engine.max_model_len=1024", "engine.cpu_kvcache_gb=1",
           "engine.startup_timeout_s=600", f"engine.log_dir={tmp_path / 'logs'}",
           "sampling.max_tokens=128", "sampling.ignore_eos=true", f"output={out}", "progress=off"]
    with open(tmp_path / "collect.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Mid-run: node B's engine has delivered work and there is plenty left to do.
        wait_until(lambda: proc.poll() is not None or sum(r["engine"] == "engine1" for r in rows_of(out)) >= 4 * k,
                   900, "engine1 (node B) to deliver results")
        assert proc.poll() is None, (tmp_path / "collect.log").read_text()[-4000:]
        done_at_kill = len(rows_of(out))
        port = re.search(r"engine1: starting -> ready on node \S+ \([\d.]+s, http://[\d.]+:(\d+)\)",
                         (tmp_path / "collect.log").read_text()).group(1)
        assert servers_on_port(port), "cannot find node B's vLLM server"
        ray_cluster.kill_node("node_b")
        assert done_at_kill < prompts * k, "the run finished before node B was stopped; the test proves nothing"
        wait_until(lambda: not servers_on_port(port), 120, "node B's vLLM server to die with its actor's worker")
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    logs = (tmp_path / "collect.log").read_text()
    assert proc.returncode == 0, logs[-4000:]
    rows = rows_of(out)
    ids = Counter(r["id"] for r in rows)
    assert len(ids) == prompts * k and set(ids.values()) == {1}, "a sample is missing or written twice"
    assert not (tmp_path / "out.errors.jsonl").exists() or not (tmp_path / "out.errors.jsonl").read_text()
    assert {r["engine"] for r in rows} == {"engine0", "engine1"}
    # The pool noticed, it did not just get lucky: straight from live when Ray reports the node dead first, or
    # through suspect when a refused call comes first and its probe fails (CI's loaded cores: Ray's heartbeat
    # detector took 15 s to call the node dead while calls were already refused).
    assert re.search(r"engine1: (live|suspect) -> dead", logs), logs[-4000:]
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["samples"] == prompts * k and summary["failed_prompts"] == 0


def fake_python(tmp_path: Path) -> str:
    """An ``engine.python`` whose "vLLM server" is tests/fake_engine.py: placement without engine start-up."""
    script = tmp_path / "fake-python"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name("fake_engine.py")} "$@"\n')
    script.chmod(0o755)
    return str(script)


def node_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


@pytest.mark.slow
async def test_spread_placement_node_loss_and_replacement_on_a_new_node(ray_cluster, tmp_path):
    from rollout_plugin.config.schema import EngineConfig
    from rollout_plugin.pool.engines.ray_backend import RayEngines

    engine = EngineConfig(model="fake", python=fake_python(tmp_path), log_dir=str(tmp_path / "logs"),
                          startup_timeout_s=120)
    # A quarter CPU each: both replicas would fit on one node, so only spreading puts them on two.
    cfg = RayConfig(address=ray_cluster.address, placement=RayPlacement.spread, num_cpus=0.25, node_poll_s=0.5,
                    replace_timeout_s=120)
    engines = RayEngines(engine, cfg)
    dead: asyncio.Queue[int] = asyncio.Queue()
    grew: asyncio.Queue[str] = asyncio.Queue()
    try:
        endpoints = await engines.start(2, 8)
        placed = [r.node_id for r in engines._replicas]
        node_b = node_with("node_b")
        assert sorted(placed) == sorted([node_with("node_a"), node_b])
        lost = placed.index(node_b)
        lost_port = endpoints[lost].url.rsplit(":", 1)[1]
        assert servers_on_port(lost_port)
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(engines.watch(lambda i, reason: dead.put_nowait(i), grew.put_nowait))
            await asyncio.to_thread(ray_cluster.kill_node, "node_b")
            assert await asyncio.wait_for(dead.get(), 120) == lost
            await asyncio.to_thread(wait_until, lambda: not servers_on_port(lost_port), 60,
                                    "the lost node's server to die with its actor's worker")
            await asyncio.to_thread(ray_cluster.start_node, "node_c")
            await asyncio.wait_for(grew.get(), 120)
            fresh = await engines.replace(lost)
            assert engines._replicas[lost].node_id == node_with("node_c")  # the node holding none of ours
            assert servers_on_port(fresh.url.rsplit(":", 1)[1])
            assert dead.empty()  # replacing is not another death
            watch.cancel()
    finally:
        await asyncio.to_thread(engines.close)
    assert not [p for p in marked_pids(ray_cluster.mark) if b"fake_engine" in _cmdline(p)]


@pytest.mark.slow
async def test_pool_gives_up_on_a_lost_node_then_refills_the_slot_when_a_node_joins(ray_cluster, tmp_path):
    from rollout_plugin.config.schema import EngineConfig, PoolConfig, PrewarmConfig
    from rollout_plugin.pool.api.pool import RolloutPool

    engine = EngineConfig(model="fake", python=fake_python(tmp_path), log_dir=str(tmp_path / "logs"),
                          startup_timeout_s=120)
    # Restarts: the try that finds no node, then one per start of the new node (start_node_until: up to 3).
    pool_cfg = PoolConfig(engines=2, max_restarts=4, backend=PoolBackend.ray, prewarm=PrewarmConfig(requests=0),
                          ray=RayConfig(address=ray_cluster.address, nodes=["node_a", "node_b"], num_cpus=0.25,
                                        replace_timeout_s=5, node_poll_s=0.5))

    def engine1_healthy(pool: RolloutPool) -> bool:
        return pool.stats().engines[1].healthy

    async with RolloutPool(engine, pool_cfg) as pool:
        first = pool.endpoints[1].url
        await asyncio.to_thread(ray_cluster.kill_node, "node_b")
        # Noticed through the actor's death alone: no request was in flight to fail.
        await asyncio.to_thread(wait_until, lambda: not engine1_healthy(pool) and 1 in pool._given_up, 120,
                                "engine1 to be marked dead and its replacement to give up (no node_b)")
        starts = await asyncio.to_thread(ray_cluster.start_node_until, "node_b", lambda: engine1_healthy(pool),
                                         180, "engine1 to rejoin on the new node")  # same marker, new machine
        fresh = pool._require().clients[1].root
        assert fresh != first and servers_on_port(fresh.rsplit(":", 1)[1])
        # The failed try and the one that worked, plus one per new node Ray itself lost under load.
        assert 2 <= pool._restarts[1] <= starts + 1
    assert not [p for p in marked_pids(ray_cluster.mark) if b"fake_engine" in _cmdline(p)]


@pytest.mark.slow
async def test_a_joining_node_adds_an_engine_up_to_max_engines(ray_cluster, tmp_path):
    from rollout_plugin.config.schema import EngineConfig, PoolConfig, PrewarmConfig
    from rollout_plugin.pool.api.pool import RolloutPool

    engine = EngineConfig(model="fake", python=fake_python(tmp_path), log_dir=str(tmp_path / "logs"),
                          startup_timeout_s=120)
    pool_cfg = PoolConfig(engines=1, backend=PoolBackend.ray, prewarm=PrewarmConfig(requests=0),
                          ray=RayConfig(address=ray_cluster.address, num_cpus=0.25, max_engines=2,
                                        replace_timeout_s=30, node_poll_s=0.5))
    async with RolloutPool(engine, pool_cfg) as pool:
        assert len(pool.stats().engines) == 1
        await asyncio.to_thread(ray_cluster.start_node_until, "node_c", lambda: len(pool.stats().engines) == 2,
                                180, "a second engine to join when node_c did")  # a machine joins the cluster
        stats = pool.stats()
        assert not pool.provider.can_grow(len(stats.engines))  # max_engines reached: no third
        assert await pool._require().clients[1].healthy()  # the stand-in server answers /health only
        urls = [ep.url for ep in pool.endpoints]
    assert [e.name for e in stats.engines] == ["engine0", "engine1"] and all(e.healthy for e in stats.engines)
    assert len(set(urls)) == 2 and servers_on_port(urls[1].rsplit(":", 1)[1]) == []  # gone with the pool
