"""Issue 21: what would make a user's first GPU run fail, checked on CPU (fake nvidia-smi, recording servers, the
NCCL side mocked). One test (or two) per item of the issue, named after it."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from rollout_plugin.config.schema import EngineConfig, PoolConfig
from rollout_plugin.errors import ConfigError, TrainerAdapterError
from rollout_plugin.pool.engines.placement import GpuInventory, place_engines

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "gpu_smoke.sh"
TWO_GPUS = GpuInventory(("0", "1"), "nvidia-smi", 79.6)


def _fake_smi(tmp_path: Path, gpus: int = 2, mib: int = 81559) -> Path:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    smi = shim / "nvidia-smi"
    rows = "".join(f"{i}, {mib}\\n" for i in range(gpus))
    smi.write_text(f"#!/bin/sh\nprintf '{rows}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return shim


# --- items 2-4: the smoke script reads what the steps write ------------------------------------------------
def test_item2_smoke_reads_the_collect_summary_where_collect_writes_it():
    from rollout_plugin.collect.output import summary_path

    read = re.findall(r'"\$OUT/([^"]*summary\.json)"', SMOKE.read_text())
    assert read, "the collect step must judge from its summary file"
    assert set(read) == {summary_path(Path("collect.jsonl")).name}


def test_item3_the_colocated_trl_step_gives_a_utilization_placement_accepts():
    text = SMOKE.read_text()
    default = re.search(r'^TRL_GPU_UTIL="\$\{TRL_GPU_UTIL:-([^}]*)\}"', text, re.M)
    assert default is not None and 'engine.gpu_memory_utilization="$TRL_GPU_UTIL"' in text
    util = float(default[1])  # "null" (today) is no number: placement would ask for one
    cfg = EngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct", devices=["0", "1"], trainer_devices=["0", "1"],
                       colocate=True, gpu_memory_utilization=util)
    assert place_engines(TWO_GPUS, cfg, 2).gpu_memory_utilization == util


def _trl_judge() -> str:
    m = re.search(r"^TRL_JUDGE='(.*?)'$", SMOKE.read_text(), re.M | re.S)
    assert m is not None, "the TRL steps are judged from rollout_pool_run.json by TRL_JUDGE"
    return m[1]


class _SummaryPool:
    """The pool as write_run_summary sees it: control answers of engines whose weights moved to version 2."""

    def __init__(self, moved: bool = True):
        self.weight_version = 2
        self.moved = moved

    def run(self, fn):
        from rollout_plugin.pool import RpcAnswer

        def answer(path, body=None, method="POST", **_):
            if path == "/weight_info":
                return [RpcAnswer(e, 200, {"weight_version": "2"}) for e in ("engine0", "engine1")]
            sums = {"w": "new" if self.moved else "old"}
            return [RpcAnswer(e, 200, {"checksums": sums}) for e in ("engine0", "engine1")]

        return fn(SimpleNamespace(engine_rpc=answer))


def test_item4_trl_steps_pass_from_the_run_summary_not_a_log_line(tmp_path):
    from rollout_plugin.adapters.trl.entry import RUN_SUMMARY, write_run_summary

    assert "CHECKSUM_PATTERN" not in SMOKE.read_text() and "rollout_pool_run.json" in SMOKE.read_text()
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=2), args=SimpleNamespace(max_steps=2))
    before = {e: {"weight_version": "0", "checksum": "x"} for e in ("engine0", "engine1")}
    verdicts = []
    for moved in (True, False):
        path = tmp_path / str(moved) / RUN_SUMMARY
        write_run_summary(path, trainer, _SummaryPool(moved), before if moved else {})
        if not moved:  # the engines still hold the weights they started with
            data = json.loads(path.read_text())
            for e in data["engines"].values():
                e["initial_checksum"] = e["checksum"]
            data["weights_changed"] = False
            path.write_text(json.dumps(data))
        out = subprocess.run([sys.executable, "-c", _trl_judge(), str(path), "2"], capture_output=True, text=True,
                             timeout=60)
        verdicts.append(out.stdout.strip())
    assert verdicts[0].startswith("ok: 2 steps, pool at weight version 2") and "checksums agree: True" in verdicts[0]
    assert not verdicts[1].startswith("ok:") and "changed since the start: False" in verdicts[1]


# --- item 5: NCCL with colocated engines is refused -------------------------------------------------------
def test_item5_nccl_with_colocated_engines_is_refused_naming_both_keys():
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run([sys.executable, "-m", "rollout_plugin.cli.main", "trl-grpo", "weights.transport=nccl",
                          "engine.colocate=true"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode != 0
    lines = [line for line in (out.stdout + out.stderr).splitlines()
             if "weights.transport" in line and "engine.colocate" in line]
    assert len(lines) == 1 and "duplicate GPU" in lines[0], out.stdout + out.stderr


# --- item 6: engines stay off the training ranks' GPUs; the job's collective timeout ------------------------
@pytest.fixture
def make_pool_seams(monkeypatch, tmp_path):
    """make_pool with accelerate's state and the pool recorded, on a box whose nvidia-smi lists two GPUs."""
    import accelerate

    import rollout_plugin.pool as pool_pkg
    from rollout_plugin.adapters.trl import ranks

    seen: dict = {}

    class State:
        is_main_process, num_processes, process_index = True, 1, 0

        def __init__(self, cpu=False, **kwargs):
            seen["state"] = kwargs

    class Pool:
        def __init__(self, engine, pool=None, **kwargs):
            seen["engine"] = engine

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setattr(pool_pkg, "SyncRolloutPool", Pool)
    monkeypatch.setattr(ranks, "_cpu_only", lambda: False)  # ranks train on GPUs
    monkeypatch.setattr(ranks, "everyone", lambda state, fn, collectives=None: fn())
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path)}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return seen


def test_item6_under_accelerate_launch_engines_never_land_on_a_training_ranks_gpu(make_pool_seams, monkeypatch):
    from rollout_plugin.adapters.trl.ranks import make_pool

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # accelerate launch --num_processes 2 on a 2-GPU box
    with make_pool(EngineConfig(), PoolConfig(engines=1)):
        pass
    engine = make_pool_seams["engine"]
    assert engine.trainer_devices == ["0", "1"]
    with pytest.raises(ConfigError, match=r"engine.colocate=False: no GPU left for engines: 2 visible without the trainer's \(0,1\): 0 usable"):
        place_engines(TWO_GPUS, engine, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with make_pool(EngineConfig(), PoolConfig(engines=1)):
        pass
    assert place_engines(TWO_GPUS, make_pool_seams["engine"], 1).devices == (("1",),)
    with make_pool(EngineConfig(colocate=True, gpu_memory_utilization=0.3), PoolConfig(engines=1)):
        pass  # asked for: shares them
    assert make_pool_seams["engine"].trainer_devices == []


def test_item6_the_jobs_collectives_outlast_engine_start_and_a_drain(make_pool_seams):
    from rollout_plugin.adapters.trl.ranks import make_pool

    engine = EngineConfig(startup_timeout_s=900)
    with make_pool(engine, PoolConfig()):
        pass
    timeout = make_pool_seams["state"].get("timeout")
    assert timeout is not None, "PartialState() made before GRPOConfig keeps torch's 10-minute default"
    assert timeout.total_seconds() >= max(1800, 900 + 60, PoolConfig().timeouts.request_s)


# --- item 7: a failure inside an NCCL send reaches every rank ---------------------------------------------
def _thread_ranks(n: int):
    """Collectives between ``n`` threads (one per rank), each with a 10 s barrier: a rank left alone breaks it."""
    from rollout_plugin.adapters.trl.ranks import Collectives

    barrier, slots = threading.Barrier(n, timeout=10), [None] * n

    def for_rank(rank: int) -> Collectives:
        def gather(items: list) -> list:
            slots[rank] = list(items)
            barrier.wait()
            out = [x for s in slots for x in s]
            barrier.wait()
            return out

        return Collectives(gather=gather, broadcast=lambda obj: gather([obj])[0])

    return barrier, [for_rank(r) for r in range(n)]


class _GatheringSource:
    """A WeightSource whose every tensor is a collective across ranks (ZeRO-3 / FSDP gathers)."""

    def __init__(self, barrier):
        import torch
        from vllm.distributed.weight_transfer.base import ParamMeta

        self.barrier = barrier
        self.tensors = [("a", torch.zeros(2)), ("b", torch.ones(3))]
        self.meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.tensors]

    def metadata(self):
        return self.meta

    def __iter__(self):
        for item in self.tensors:
            self.barrier.wait()  # the gather: every rank, or none
            yield item


class _Client:
    def __init__(self, fail: str):
        self.fail, self.calls = fail, []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise TrainerAdapterError(f"engine0: POST /{name} failed: HTTP 500")

    def start_weight_update(self):
        self._call("start_weight_update")

    def update_weights(self, info):
        self._call("update_weights")

    def finish_weight_update(self):
        self._call("finish_weight_update")


@pytest.mark.parametrize("fail", ["start_weight_update", "update_weights"])
def test_item7_an_http_error_on_rank_0_inside_send_fails_every_rank_with_the_cause(monkeypatch, fail):
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from vllm.distributed.weight_transfer import nccl_engine

    from rollout_plugin.adapters.trl.nccl import send_weights

    barrier, colls = _thread_ranks(2)
    source = _GatheringSource(barrier)
    client = _Client(fail)
    # The broadcast consumes the pairs as vLLM's does; the engines' receive failed at once (update_weights).
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", lambda iterator, **_: [x for x in iterator])
    engines = [nccl_engine.NCCLTrainerWeightTransferEngine(client=client, source=source, is_sender=True),
               nccl_engine.NCCLTrainerWeightTransferEngine(client=None, source=source, is_sender=False)]
    engines[0].model_update_group = SimpleNamespace()
    results: list = [None, None]

    def rank(r: int) -> None:
        acc = SimpleNamespace(is_main_process=r == 0, process_index=r, num_processes=2)
        try:
            send_weights(engines[r], source, acc, colls[r])
        except BaseException as exc:  # noqa: BLE001 - the verdict of this rank
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(isinstance(e, threading.BrokenBarrierError) for e in results), results  # no rank left waiting
    assert isinstance(results[0], TrainerAdapterError) and f"/{fail} failed" in str(results[0])
    assert isinstance(results[1], TrainerAdapterError) and "rank 0" in str(results[1]) and fail in str(results[1])
    assert "finish_weight_update" not in client.calls


def test_item7_a_worker_side_init_error_ends_rank_0s_rendezvous_at_once(monkeypatch):
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from vllm.distributed.weight_transfer import nccl_engine

    from rollout_plugin.adapters.trl.nccl import trainer_init

    never = threading.Event()
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda init: never.wait(120))  # no worker joins

    class Client:
        def init_weight_transfer_engine(self, payload):
            raise TrainerAdapterError("engine0: POST /init_weight_transfer_engine failed: HTTP 500 (NCCL error)")

    init = nccl_engine.NCCLTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=1, world_size=2)
    done = threading.Event()
    caught: list = []

    def run() -> None:
        try:
            trainer_init(init, client=Client(), source=SimpleNamespace())
        except TrainerAdapterError as exc:
            caught.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(20), "rank 0 stayed blocked creating its communicator"
    never.set()
    assert caught and "/init_weight_transfer_engine failed" in str(caught[0])


# --- item 8: NCCL update memory --------------------------------------------------------------------------
def test_item8_nccl_engines_leave_room_for_the_transfer_buffers_and_the_keys_reach_vllm(monkeypatch):
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from rollout_plugin.adapters.trl.config import TrlGrpoConfig, WeightsConfig, WeightTransport
    from rollout_plugin.adapters.trl.entry import nccl_engine_utilization
    from rollout_plugin.adapters.trl.nccl import NcclOptions, NcclTransport
    from rollout_plugin.tuning.spec import GIB

    cfg = TrlGrpoConfig(weights=WeightsConfig(transport=WeightTransport.nccl))
    small = GpuInventory(("0", "1"), "nvidia-smi", 23.6)  # a 24 GB card: vLLM at 0.9 leaves 2.4 GiB
    util, why = nccl_engine_utilization(cfg, "Qwen/no-local-config", small)
    assert util is not None and (1 - util) * 23.6 * GIB >= 2 * GIB + 1 * GIB and "NCCL" in why
    assert nccl_engine_utilization(cfg, "Qwen/no-local-config", TWO_GPUS)[0] == 0.9  # 80 GB: 8 GiB is room
    cfg.weights.nccl_buffer_mib, cfg.weights.nccl_num_buffers = 256, 1
    assert nccl_engine_utilization(cfg, "Qwen/no-local-config", small)[0] == 0.9
    # The keys reach vLLM's trainer init (and from there every worker's init payload).
    transport = NcclTransport(None, SimpleNamespace(is_main_process=False, process_index=1, num_processes=2),
                              options=NcclOptions(host="h", buffer_bytes=256 << 20, num_buffers=1))
    monkeypatch.setattr("rollout_plugin.adapters.trl.nccl.on_main", lambda acc, fn, c=None: 3)
    monkeypatch.setattr("rollout_plugin.adapters.trl.nccl.everyone", lambda acc, fn, c=None: fn())
    transport._open()  # a non-sender rank: vLLM's engine object, no group
    assert (transport.engine.packed_buffer_size_bytes, transport.engine.packed_num_buffers) == (256 << 20, 1)


def test_item8_the_planner_counts_the_update_memory():
    from rollout_plugin.tuning import MODEL_PRESETS
    from rollout_plugin.tuning.memory import nccl_update_bytes
    from rollout_plugin.tuning.planner import colocated_utilization
    from rollout_plugin.tuning.spec import HARDWARE_PRESETS

    model, hw = MODEL_PRESETS["qwen2.5-7b"], HARDWARE_PRESETS["a100-40"]
    update = nccl_update_bytes(model)
    assert update > 2 * (1 << 30)  # two 1 GiB buffers and a layer
    plain, _ = colocated_utilization(model, hw, 8, offload=False)
    counted, _ = colocated_utilization(model, hw, 8, offload=False, update_bytes=update)
    assert counted < plain


# --- item 9: a verl plugin that fails to import says so ---------------------------------------------------
def test_item9_a_broken_plugin_import_is_named_where_the_resolver_fails():
    code = ("import sys\n"
            "sys.modules['rollout_plugin.tuning'] = None  # a dependency of the resolvers fails to import\n"
            "import rollout_plugin.adapters.verl.plugin\n"
            "from omegaconf import OmegaConf\n"
            "cfg = OmegaConf.create({'x': '${rollout_pool.tuned:actor_rollout_ref.rollout.max_num_seqs}'})\n"
            "try:\n"
            "    cfg.x\n"
            "except Exception as exc:\n"
            "    print('ERROR', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "failed to import" in out.stdout and "ImportError" in out.stdout
    assert "pip install 'rollout-plugin[verl]'" in out.stdout and "Unsupported interpolation" not in out.stdout


def test_item9_the_stand_in_resolvers_are_the_ones_register_registers(monkeypatch):
    from omegaconf import OmegaConf

    from rollout_plugin.adapters.verl import plugin, resolvers

    names = []
    monkeypatch.setattr(OmegaConf, "register_new_resolver", lambda name, fn, replace=False: names.append(name))
    resolvers.register()
    assert tuple(names) == plugin.RESOLVERS


# --- item 1: the verl route against verl's own vLLM 0.24 servers ------------------------------------------
class _Vllm024:
    """A vLLM 0.24 API server as the verl router sees it: /metrics with v1 engine metric names
    (vllm/v1/metrics/loggers.py), no /version check expected and no RL endpoints (0.24 has none of ≥ 0.32's)."""

    METRICS = ("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 1.0\n"
               "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 0.0\n"
               "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n"
               "# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{model_name=\"m\"} 42.0\n")

    def __enter__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.paths.append(self.path)
                body = server.METRICS.encode() if self.path == "/metrics" else b'{"detail":"Not Found"}'
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_item1_the_verl_router_needs_nothing_of_vllm_032_from_a_024_server():
    import asyncio

    from rollout_plugin.adapters.verl.router import PoolRouter
    from rollout_plugin.pool.observe.telemetry import parse_vllm_metrics

    m = parse_vllm_metrics(_Vllm024.METRICS)
    assert (m.running, m.waiting, m.kv_usage, m.generation_tokens_total) == (1, 0, 0.25, 42.0)

    class Handle:
        class get_rollout_config:  # noqa: N801 - verl's remote method shape
            @staticmethod
            def remote():
                return {"max_num_seqs": 4, "n": 1, "max_model_len": 1024}

    async def main(url: str) -> None:
        router = PoolRouter({"s0": Handle()}, {"router_class": "x", "metrics_url": url + "/metrics",
                                               "controller": {"mode": "adaptive", "interval_s": 0.05}})
        server, _ = await router.acquire_server("r0", prompt_ids=[1])
        await router.release_server(server, request_id="r0")
        await router.close()

    with _Vllm024() as vllm:
        asyncio.run(main(vllm.url))
    assert set(vllm.paths) <= {"/metrics"}, vllm.paths  # no /version, no RL endpoint asked of a 0.24 server


# --- the preflight: torch only; on a machine without CUDA it says so and exits 0 ---------------------------
def test_gpu_preflight_says_there_is_no_cuda_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA box: run scripts/gpu_preflight.py itself")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_preflight.py")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("SKIP cuda") and "no CUDA here" in out.stdout, out.stderr
