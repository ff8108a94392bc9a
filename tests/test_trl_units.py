"""TRL adapter logic that needs no engine: version pin, sampling mapping, weight naming, recipes, plan, attention
shim, the rank collectives (fake ranks on threads), logprob checks, the weight-sync call sequences (folder and
NCCL) against recording servers, segment versions and staleness, and the async worker's carry-over (a real pool
over in-memory engines)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from rollout_plugin.errors import ConfigError, TrainerAdapterError  # noqa: E402
from rollout_plugin.types import Request, Result, Sample, SamplingParams, Segment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.0rc1"])
def test_supported_trl_versions_pass(version):
    from rollout_plugin.adapters.trl.compat import check_trl_version

    check_trl_version(version)


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "0.29.1", "2.0"])
def test_other_trl_versions_fail_with_the_fix(version):
    from rollout_plugin.adapters.trl.compat import check_trl_version

    with pytest.raises(TrainerAdapterError, match=r'pip install "trl>=1.16,<1.17"'):
        check_trl_version(version)


def _trainer_args(**over):
    base = dict(max_completion_length=8, temperature=0.7, top_p=0.9, top_k=0, min_p=None, repetition_penalty=1.0,
                generation_kwargs=None, vllm_structured_outputs_regex=None)
    return SimpleNamespace(args=SimpleNamespace(**{**base, **over}))


def test_trainer_sampling_maps_trl_settings_and_asks_for_logprobs():
    from rollout_plugin.adapters.trl.sampling import trainer_sampling

    sp = trainer_sampling(_trainer_args(top_k=5))
    assert sp == SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, logprobs=True)
    assert trainer_sampling(_trainer_args()).top_k == -1  # TRL's 0 = off = vLLM's -1


def test_trainer_sampling_refuses_all_unsupported_settings_at_once():
    from rollout_plugin.adapters.trl.sampling import trainer_sampling

    with pytest.raises(TrainerAdapterError) as err:
        trainer_sampling(_trainer_args(repetition_penalty=1.1, min_p=0.05))
    assert "repetition_penalty=1.1" in str(err.value) and "min_p=0.05" in str(err.value)


def test_failed_rollouts_fail_the_step_and_good_ones_unpack_in_group_order():
    from rollout_plugin.adapters.common.translate import checked, unpack

    req = Request("a", [1, 2], n=2)
    ok = Result("a", samples=(Sample("x", (5, 6), (-0.1, -0.2)), Sample("y", (7,), (-0.3,))), weight_version=4,
                request=req)
    ids, lps, versions, spans = unpack(checked([ok]))
    assert ids == [[5, 6], [7]] and lps == [[-0.1, -0.2], [-0.3]] and versions == [4, 4]
    assert spans == [[(4, 0, 2)], [(4, 0, 1)]]  # no segments reported: every token from the result's version
    with pytest.raises(TrainerAdapterError, match="1 of 2 rollout requests failed; first: b: boom"):
        checked([ok, Result("b", error="boom")])


def test_weights_are_written_under_the_checkpoint_names_vllm_loads(model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rollout_plugin.adapters.common.weights import named_weights, write_weights

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    path = write_weights(named_weights(model), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as mine, safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as orig:
        assert set(mine.keys()) == set(orig.keys())
        key = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(mine.get_tensor(key), orig.get_tensor(key))  # bf16 -> fp32 -> bf16 is exact
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_apply_plan_fills_only_what_the_user_left_open():
    from rollout_plugin.adapters.trl.plan import apply_plan

    planned = {"gradient_checkpointing": True, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8,
               "learning_rate": 1.0}
    out, changes = apply_plan({"per_device_train_batch_size": 16}, planned,
                              {"gradient_checkpointing": False, "gradient_accumulation_steps": 1})
    assert out == {"per_device_train_batch_size": 16, "gradient_checkpointing": True, "gradient_accumulation_steps": 8}
    assert changes == ["trl.gradient_checkpointing: False -> True (planner)",
                       "trl.gradient_accumulation_steps: 1 -> 8 (planner)"]
    assert apply_plan({"a": 1}, None) == ({"a": 1}, [])


def _compose(args):
    from rollout_plugin.adapters.trl.config import TrlGrpoConfig, register_trl_configs
    from rollout_plugin.cli.app import compose
    from rollout_plugin.cli.trl_grpo import _recipe

    register_trl_configs()
    return compose("trl_grpo", _recipe(args), TrlGrpoConfig)


def test_recipes_compose_and_the_command_line_wins():
    cfg = _compose(["--recipe", str(ROOT / "recipes/trl/cpu_tiny.yaml"), "trl.max_steps=3", "route=rollout_func"])
    assert cfg.trl["max_steps"] == 3 and cfg.trl["num_generations"] == 8
    assert cfg.engine.dev_mode and cfg.engine.max_model_len == 512
    assert cfg.rewards[0].kwargs == {"token_id": 1979} and cfg.route.value == "rollout_func"
    gpu = _compose(["--recipe", str(ROOT / "recipes/trl/gpu_qwen_gsm8k.yaml")])
    assert gpu.engine.model == gpu.trainer_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert gpu.dataset.path.endswith(":gsm8k_dataset") and gpu.trl["bf16"] is True


def test_every_recipe_yaml_starts_with_its_command():
    for path in [*ROOT.glob("recipes/trl/*.yaml"), ROOT / "hydra_conf/trl_grpo.yaml"]:
        assert path.read_text().startswith("# rollout-plugin trl-grpo"), path


def test_unknown_grpo_keys_are_reported_together_with_the_nearest_field():
    import dataclasses

    from trl import GRPOConfig

    from rollout_plugin.adapters.trl.entry import grpo_kwargs

    cfg = _compose(["trl.max_stepz=3", "trl.num_generation=4"])
    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    with pytest.raises(ConfigError) as err:
        grpo_kwargs(cfg, fields, None)
    text = str(err.value)
    assert "trl.max_stepz=3: not a GRPOConfig field (try trl.max_steps=…)" in text
    assert "trl.num_generation=4" in text and "trl.num_generations=…" in text


def test_attach_refuses_what_it_cannot_serve():
    from rollout_plugin.adapters.trl import attach

    with pytest.raises(TrainerAdapterError, match="serves GRPOTrainer and RLOOTrainer, not SimpleNamespace"):
        attach(SimpleNamespace(), None)


def test_pool_metrics_report_tokens_per_second_between_snapshots():
    from rollout_plugin.adapters.common.metrics import PoolLogMetrics
    from rollout_plugin.pool.observe.stats import EngineStats, PoolStats

    class Pool:  # the stats a SyncRolloutPool reports, in memory
        weight_version = 2
        tokens, elapsed = 0, 0.0

        def stats(self):
            e = EngineStats("e0", True, 3, 16, 1, 1, 1, self.tokens, 0, 1.0, 3)
            return PoolStats(self.elapsed, [e], 1, 0, 1, 5)

        def run(self, fn):
            return None  # no engine telemetry yet

    pool, metrics = Pool(), PoolLogMetrics()
    first = metrics.snapshot(pool)
    assert "tokens_per_s" not in first and first["inflight"] == 3 and first["queued"] == 5
    pool.tokens, pool.elapsed = 500, 2.0
    assert metrics.snapshot(pool)["tokens_per_s"] == 250.0


def test_torch_tree_attention_matches_causal_attention_per_segment():
    from rollout_plugin.adapters.trl.async_worker import _TorchVarlen

    torch.manual_seed(0)
    lens = [3, 5]
    q = torch.randn(sum(lens), 4, 8)
    k = torch.randn(sum(lens), 2, 8)  # grouped-query: 2 kv heads for 4 query heads
    v = torch.randn(sum(lens), 2, 8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = _TorchVarlen.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, softmax_scale=None, causal=True)
    for a, b in ((0, 3), (3, 8)):
        qi, ki, vi = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(qi, ki.repeat_interleave(2, 0),
                                                               vi.repeat_interleave(2, 0), is_causal=True)
        assert torch.allclose(out[a:b], ref.transpose(0, 1), atol=1e-5)


def test_importing_the_adapter_does_not_import_trl():
    import subprocess
    import sys

    code = ("import sys, rollout_plugin.trl, rollout_plugin.adapters.trl.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# -- ranks: TRL's gather → group → broadcast → slice, on fake ranks ----------------------------------------------

class _Hub:
    """In-memory collectives for ``world`` ranks on threads: each call is a rendezvous (a barrier per step)."""

    def __init__(self, world: int):
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def collectives(self, rank: int):
        from rollout_plugin.adapters.trl.ranks import Collectives

        def exchange(value):
            self.slots[rank] = value
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read it
            return out

        return Collectives(gather=lambda items: [x for part in exchange(items) for x in part],
                           broadcast=lambda obj: exchange(obj)[0])


def _on_ranks(world: int, fn):
    """``fn(accelerator, collectives)`` on ``world`` fake ranks at once; each rank's return value or exception."""
    from concurrent.futures import ThreadPoolExecutor

    hub = _Hub(world)
    accs = [SimpleNamespace(is_main_process=r == 0, process_index=r, num_processes=world) for r in range(world)]
    with ThreadPoolExecutor(world) as ex:
        futures = [ex.submit(fn, accs[r], hub.collectives(r)) for r in range(world)]
    out = []
    for f in futures:
        try:
            out.append(f.result())
        except Exception as exc:  # noqa: BLE001 - the test looks at each rank's failure
            out.append(exc)
    return out


def test_share_groups_generates_each_distinct_prompt_once_and_slices_per_rank():
    from rollout_plugin.adapters.trl.ranks import share_groups

    k, calls = 2, []

    def generate(unique):
        calls.append(list(unique))
        ids = [[p[0], j] for p in unique for j in range(k)]  # completion j of prompt p
        return ids, [[-0.5] * 2 for _ in ids], [7] * len(ids)

    def rank(acc, coll):
        prompts = [[10 * acc.process_index + i] for i in range(2) for _ in range(k)]  # 2 prompts × k on each rank
        return share_groups(acc, prompts, k, generate, coll)

    out = _on_ranks(3, rank)
    assert calls == [[[0], [1], [10], [11], [20], [21]]]  # once, on the main process, rank order
    for r, (prompt_ids, (completion_ids, logprobs, versions)) in enumerate(out):
        assert prompt_ids == [[10 * r], [10 * r], [10 * r + 1], [10 * r + 1]]
        assert completion_ids == [[10 * r, 0], [10 * r, 1], [10 * r + 1, 0], [10 * r + 1, 1]]
        assert len(logprobs) == 4 and versions == [7] * 4


def test_a_group_may_span_ranks():
    from rollout_plugin.adapters.trl.ranks import share_groups

    def generate(unique):
        assert unique == [[9]]
        return ([[j] for j in range(4)],)

    out = _on_ranks(2, lambda acc, coll: share_groups(acc, [[9]] * 2, 4, generate, coll))
    assert [cols[0] for _, cols in out] == [[[0], [1]], [[2], [3]]]


def test_a_failure_on_the_main_process_fails_every_rank_instead_of_hanging_them():
    from rollout_plugin.adapters.trl.ranks import share_groups

    def generate(unique):
        raise TrainerAdapterError("engine0 is on fire")

    out = _on_ranks(3, lambda acc, coll: share_groups(acc, [[acc.process_index]] * 2, 2, generate, coll))
    assert isinstance(out[0], TrainerAdapterError) and str(out[0]) == "engine0 is on fire"
    for exc in out[1:]:
        assert isinstance(exc, TrainerAdapterError)
        assert "the main process (rank 0) failed: TrainerAdapterError: engine0 is on fire" in str(exc)


def test_a_failure_on_another_rank_fails_the_main_process_too():
    from rollout_plugin.adapters.trl.ranks import everyone

    def work(acc):
        if acc.process_index == 2:
            raise OSError("disk full")
        return "done"

    out = _on_ranks(3, lambda acc, coll: everyone(acc, lambda: work(acc), coll))
    assert isinstance(out[2], OSError)
    assert all(isinstance(e, TrainerAdapterError) and str(e) == "rank 2 failed: OSError: disk full" for e in out[:2])
    assert _on_ranks(2, lambda acc, coll: everyone(acc, lambda: acc.process_index + 10, coll)) == [10, 10]


def test_a_short_answer_from_the_pool_is_refused_on_every_rank():
    from rollout_plugin.adapters.trl.ranks import share_groups

    out = _on_ranks(2, lambda acc, coll: share_groups(acc, [[1]] * 2, 2, lambda u: ([[5]],), coll))
    assert all(isinstance(e, TrainerAdapterError) and "1 completions for 2 prompts × num_generations=2" in str(e)
               for e in out)


def test_a_pool_on_another_rank_is_refused_with_the_fix():
    from rollout_plugin.adapters.common.ranks import check_one_pool

    check_one_pool(SimpleNamespace(is_main_process=True, process_index=0, num_processes=2), object())
    check_one_pool(SimpleNamespace(is_main_process=False, process_index=1, num_processes=2), None)
    with pytest.raises(TrainerAdapterError, match=r"rank 1 of 2.*rollout_plugin\.trl\.make_pool"):
        check_one_pool(SimpleNamespace(is_main_process=False, process_index=1, num_processes=2), object())


# -- logprobs: missing ones fail loudly; TRL's warning for biased ones ------------------------------------------------

@pytest.mark.parametrize("logprobs, got", [(None, "got none"), ((-0.1,), "got 1 for 2 tokens")])
def test_missing_logprobs_fail_the_step_naming_the_engine_and_the_fix(logprobs, got):
    from rollout_plugin.adapters.common.translate import unpack

    bad = Result("q7", samples=(Sample("x", (5, 6), (-0.1, -0.2)), Sample("y", (7, 8), logprobs)), engine="engine1")
    with pytest.raises(TrainerAdapterError) as err:
        unpack([bad])
    text = str(err.value)
    assert text.startswith("engine1: no logprob per sampled token for q7 sample 1") and got in text
    assert "--logprobs-mode processed_logprobs" in text and "engine.extra_args" in text


def test_the_async_worker_refuses_missing_logprobs_too():
    from rollout_plugin.adapters.trl.async_worker import PoolRolloutWorker

    tok = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["t"] * len(ids))
    worker = PoolRolloutWorker(None, [], [lambda prompts, completions, completion_ids, **kw: [1.0, 0.0]], tok,
                               num_generations=2, sampling=SamplingParams(max_tokens=2))
    result = Result("g", samples=(Sample("a", (1,), (-0.2,)), Sample("b", (2,), None)), engine="engine0")
    with pytest.raises(TrainerAdapterError, match="engine0: no logprob per sampled token for g sample 1"):
        worker._score({"prompt": "p"}, [3], result)


def test_the_logprobs_mode_warning_is_trls_own():
    import inspect
    import re

    from trl.trainer import grpo_trainer

    from rollout_plugin.adapters.trl.sampling import logprobs_mode_warnings

    def info(mode):
        return {"vllm_config": {"model_config": {"logprobs_mode": mode}}}

    (line,) = logprobs_mode_warnings({"engine0": info("processed_logprobs"), "engine1": info("raw_logprobs")})
    assert line.startswith("engine1: The vLLM server runs with `--logprobs-mode raw_logprobs`, which biases")
    trl_source = re.sub(r'"\s+f?"', "", inspect.getsource(grpo_trainer))  # TRL's message, its pieces joined
    tail = ("which biases the importance sampling correction. Restart it with `--logprobs-mode processed_logprobs`, "
            "or set `vllm_importance_sampling_correction=False`.")
    assert tail in trl_source and tail in line


# -- weight sync call sequences, against recording servers (real HTTP, real pool) ----------------------------------

ADAPTER_PATHS = ("/collective_rpc", "/reset_prefix_cache", "/server_info", "/get_world_size",
                 "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update")


class RecordingEngine:
    """A vLLM server as far as the TRL adapter's control calls go: answers them and records each one.

    ``hold``: path -> threading.Event; a call to that path waits (up to 30 s) until the event is set, as vLLM's
    blocks in an NCCL rendezvous or receive until the trainer side joins."""

    QUIET = ("/health", "/v1/models", "/metrics")

    def __init__(self, world_size: int = 1, logprobs_mode: str = "processed_logprobs", transfer: bool = True):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.calls: list[tuple[str, str, dict | None]] = []
        self.hold: dict[str, threading.Event] = {}
        self.arrived: dict[str, threading.Event] = {}
        info = {"vllm_config": {"model_config": {"logprobs_mode": logprobs_mode},
                                "weight_transfer_config": {"backend": "nccl"} if transfer else None}}
        answers = {"/v1/models": {"data": [{"id": "rec"}]}, "/health": {},
                   "/get_world_size": {"world_size": world_size}, "/server_info": info,
                   "/version": {"version": "0.32.0"}, "/weight_info": {"weight_version": "0"},
                   "/weight_checker": {"checksums": {"w": "same"}}}
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str, body: dict | None) -> None:
                path = self.path.split("?")[0]
                if path not in engine.QUIET:
                    engine.calls.append((method, path, body))
                    engine.arrived.setdefault(path, threading.Event()).set()
                if path in engine.hold and not engine.hold[path].wait(30):
                    return self._send(500, {"error": f"{path}: the trainer side never joined"})
                if path == "/update_weight_version":  # the pool's engine identity: read back from /weight_info
                    answers["/weight_info"] = {"weight_version": body["new_version"]}
                if method == "GET" and path not in answers:
                    return self._send(405, {})  # a POST route, probed with GET (as FastAPI answers)
                self._send(200, answers.get(path, {"success": True}))

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET", None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self._answer("POST", json.loads(self.rfile.read(n)) if n else None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        for event in self.hold.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        """The calls the TRL adapter is responsible for (not the pool's start-up probes and identity checks)."""
        return [f"{m} {p}" for m, p, _ in self.calls if p in ADAPTER_PATHS]


def _pool_over(*engines):
    from rollout_plugin import EngineConfig, PoolConfig, SyncRolloutPool

    return SyncRolloutPool(EngineConfig(urls=[e.url for e in engines], api_key="k"), PoolConfig())


def _one_process():
    return SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, device=torch.device("cpu"),
                           state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None))


def test_folder_sync_writes_then_reloads_every_engine_then_resets_caches(tmp_path):
    from safetensors.torch import load_file

    from rollout_plugin.adapters.trl.weights import WeightSync

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with RecordingEngine() as a, RecordingEngine() as b, _pool_over(a, b) as pool:
        sync = WeightSync(pool, tmp_path, accelerator=_one_process())
        record = sync.sync(model, 1)
        assert sync.sync(model, 1) is None  # once per version
        assert pool.weight_version == 1
    for engine in (a, b):
        assert engine.paths() == ["POST /collective_rpc", "POST /reset_prefix_cache"]
        reload = next(body for _, p, body in engine.calls if p == "/collective_rpc")
        assert reload["kwargs"] == {"weights_path": str(tmp_path.resolve())}
    written = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in written.items()} == {"0.weight": (2, 3), "0.bias": (2,)}
    assert record.version == 1 and record.transport == "folder" and record.sharding == "single"
    assert record.gather_s >= 0 and record.total_s >= record.load_s


def test_attach_warns_as_trl_does_about_engines_without_processed_logprobs():
    from rollout_plugin.adapters.trl.sampling import warn_biased_logprobs

    with RecordingEngine(logprobs_mode="raw_logprobs") as a, RecordingEngine() as b, _pool_over(a, b) as pool:
        grpo = SimpleNamespace(args=SimpleNamespace(vllm_importance_sampling_correction=True))
        (line,) = warn_biased_logprobs(grpo, pool)
        rloo = SimpleNamespace(args=SimpleNamespace())  # no importance-sampling correction to bias
        assert warn_biased_logprobs(rloo, pool) == []
    assert line.startswith("engine0: The vLLM server runs with `--logprobs-mode raw_logprobs`")
    assert a.paths() == ["GET /server_info"]


def _mock_nccl(monkeypatch, engines, sent: list):
    """vLLM's trainer-side NCCL seam: the rendezvous waits until every engine's init call is in flight, the
    broadcast until every engine's /update_weights is, then lets them answer (as the NCCL calls would)."""
    import threading

    from vllm.distributed.weight_transfer import nccl_engine

    for e in engines:
        for path in ("/init_weight_transfer_engine", "/update_weights"):
            e.hold[path] = threading.Event()

    def join(path):
        for e in engines:
            assert e.arrived.setdefault(path, threading.Event()).wait(30), f"{path} never reached {e.url}"
        for e in engines:
            e.hold[path].set()

    def open_endpoint(init_info):
        join("/init_weight_transfer_engine")
        return SimpleNamespace(world_size=init_info.world_size, destroy=lambda: None)  # a PyNcclCommunicator

    def broadcast(iterator, group, src, post_iter_func, **kwargs):
        sent.append([(name, tuple(post_iter_func((name, t)).shape)) for name, t in iterator])
        join("/update_weights")

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", broadcast)


def test_nccl_transport_drives_vllms_weight_transfer_calls_on_every_engine(monkeypatch):
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from rollout_plugin.adapters.trl.nccl import NcclOptions
    from rollout_plugin.adapters.trl.weights import WeightSync

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    sent: list = []
    with RecordingEngine(world_size=1) as a, RecordingEngine(world_size=2) as b, _pool_over(a, b) as pool:
        _mock_nccl(monkeypatch, [a, b], sent)
        sync = WeightSync(pool, "unused", accelerator=_one_process(), transport="nccl",
                          nccl=NcclOptions(host="10.0.0.1", port=51300))
        first = sync.sync(model, 1)
        assert pool.weight_version == 1
        sync.sync(model, 2)  # the group stays open: no second rendezvous
        assert pool.weight_version == 2
    round_ = ["POST /start_weight_update", "POST /update_weights", "POST /finish_weight_update",
              "POST /reset_prefix_cache"]
    for e in (a, b):
        assert e.paths() == ["GET /server_info", "GET /get_world_size", "POST /init_weight_transfer_engine",
                             *round_, *round_]
    inits = [body["init_info"] for e in (a, b) for _, p, body in e.calls if p == "/init_weight_transfer_engine"]
    # One group: trainer rank 0, engine a's worker at 1, engine b's two workers at 2 and 3.
    assert [i["rank_offset"] for i in inits] == [1, 2]
    assert all(i["world_size"] == 4 and i["master_address"] == "10.0.0.1" and i["master_port"] == 51300
               and i["packed"] is True for i in inits)
    update = next(body["update_info"] for _, p, body in a.calls if p == "/update_weights")
    assert update == {"names": ["0.weight", "0.bias"], "dtype_names": ["float32", "float32"], "shapes": [[2, 3], [2]]}
    # The engines hold each version the pool tagged them with (its weight identity, read back on resume).
    assert [c[2] for c in a.calls if c[1] == "/update_weight_version"] == [{"new_version": "1"}, {"new_version": "2"}]
    assert sent == [[("0.weight", (2, 3)), ("0.bias", (2,))]] * 2
    assert first.transport == "nccl" and first.write_s == 0.0


def test_nccl_transport_re_forms_the_group_for_a_stale_engine_and_refits_it_at_the_next_sync(monkeypatch):
    """Issue 19 item 2 under TRL's NCCL transport: no source to refit from, but the trainer broadcasts again at
    the next sync; the engine that came back stale joins a new group, gets the weights and rejoins."""
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from rollout_plugin.adapters.trl.nccl import NcclOptions
    from rollout_plugin.adapters.trl.weights import WeightSync
    from rollout_plugin.pool.core.lifecycle import EngineState

    async def b_restarted_stale(p):  # as RolloutPool._restart leaves an engine once the weights have moved
        d = p._require()
        for state in (EngineState.dead, EngineState.restarting, EngineState.stale):
            d.membership._move(1, state, "test: SIGKILL, restarted")
        return p.stale_engines()

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    sent: list = []
    with RecordingEngine() as a, RecordingEngine() as b, _pool_over(a, b) as pool:
        _mock_nccl(monkeypatch, [a, b], sent)
        sync = WeightSync(pool, "unused", accelerator=_one_process(), transport="nccl",
                          nccl=NcclOptions(host="10.0.0.1", port=51300))
        sync.sync(model, 1)
        assert pool.run(b_restarted_stale) == ["engine1"]
        sync.sync(model, 2)
        states = [e.state for e in pool.stats().engines]
    assert states == ["live", "live"]
    group = ["GET /server_info", "GET /get_world_size", "POST /init_weight_transfer_engine"]
    round_ = ["POST /start_weight_update", "POST /update_weights", "POST /finish_weight_update",
              "POST /reset_prefix_cache"]
    for e in (a, b):
        assert e.paths() == [*group, *round_, *group, *round_]  # a second rendezvous, every engine in it
        assert [p for _, p, _ in e.calls].count("/shutdown_weight_transfer_engine") == 1
    assert [c[2] for c in b.calls if c[1] == "/update_weight_version"][-1] == {"new_version": "2"}
    assert len(sent) == 2


def test_nccl_transport_refuses_engines_without_a_weight_transfer_engine(monkeypatch):
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from rollout_plugin.adapters.trl.weights import WeightSync

    with RecordingEngine(transfer=False) as a, _pool_over(a) as pool:
        sync = WeightSync(pool, "unused", accelerator=_one_process(), transport="nccl")
        with pytest.raises(TrainerAdapterError, match=r"engine0: the vLLM server has no weight-transfer engine.*"
                                                      r"--weight-transfer-config"):
            sync.sync(torch.nn.Linear(2, 2), 1)
        assert pool.weight_version == 0  # nothing was paused or published
    assert a.paths() == ["GET /server_info"]


def test_nccl_needs_cuda_and_launched_engines_with_a_transfer_engine():
    from rollout_plugin.adapters.trl.entry import engine_problems

    cfg = _compose(["weights.transport=nccl"])
    keys = [p.key for p in engine_problems(cfg, cuda=False)]
    assert keys == ["weights.transport", "engine.extra_args"]
    cfg.engine.extra_args = ["--weight-transfer-config", '{"backend": "nccl"}']
    assert engine_problems(cfg, cuda=True) == []


def test_make_pool_in_one_process_is_a_started_pool():
    from rollout_plugin import EngineConfig, PoolConfig
    from rollout_plugin.trl import make_pool

    with RecordingEngine() as a, make_pool(EngineConfig(urls=[a.url], api_key="k"), PoolConfig()) as pool:
        assert pool is not None and [ep.url for ep in pool.endpoints] == [a.url]
        assert pool.weight_version == 0


def test_a_held_weight_update_pauses_around_its_body_and_keeps_the_old_version_when_it_fails():
    pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    from rollout_plugin.adapters.trl.nccl import held_update

    def paused(pool):
        async def ask(p):
            return p.paused

        return pool.run(ask)

    with RecordingEngine() as a, _pool_over(a) as pool:
        with pytest.raises(RuntimeError, match="transfer broke"):
            with held_update(pool, 3):
                assert paused(pool)
                raise RuntimeError("transfer broke")
        assert not paused(pool) and pool.weight_version == 0
        with held_update(pool, 4):
            assert paused(pool)
        assert not paused(pool) and pool.weight_version == 4


# -- segment versions and staleness --------------------------------------------------------------------------------

def _spanning_group(rid: str = "g") -> Result:
    """One old token then seven new ones in the first sample; the second sample all new."""
    a = Sample("a", tuple(range(8)), (-0.1,) * 8, "length", (Segment(2, 0, 1), Segment(5, 1, 8)))
    b = Sample("b", tuple(range(8)), (-0.1,) * 8, "length", (Segment(5, 0, 8),))
    return Result(rid, samples=(a, b), weight_version=2)


def test_completions_carry_their_spans_and_their_oldest_version():
    from rollout_plugin.adapters.common.translate import unpack
    from rollout_plugin.adapters.common.versions import staleness_version, versions_spanned

    group = _spanning_group()
    _, _, versions, spans = unpack([group])
    assert versions == [2, 5]  # per completion: the oldest weights of its own tokens
    assert spans == [[(2, 0, 1), (5, 1, 8)], [(5, 0, 8)]]
    assert staleness_version(group) == 2  # the group: its oldest token anywhere
    assert [versions_spanned(s) for s in group.samples] == [2, 1]
    unknown = Sample("c", (1, 2), (-0.1, -0.1), "length", (Segment(3, None, None), Segment(4, None, None)))
    assert unpack([Result("k", samples=(unknown,), weight_version=3)])[3] == [[(3, None, None), (4, None, None)]]


def _worker(tok=None, **settings):
    from rollout_plugin.adapters.trl.async_worker import PoolRolloutWorker

    tok = tok or SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["t"] * len(ids))
    return PoolRolloutWorker(None, [], [lambda prompts, completions, completion_ids, **kw: [1.0, 0.0]], tok,
                             num_generations=2, sampling=SamplingParams(max_tokens=8), **settings)


class _ThinkingTokenizer:
    """A chat template whose output says whether ``enable_thinking=False`` reached it (last id 0, else 9)."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict, **kwargs):
        return {"input_ids": [1, 0 if kwargs.get("enable_thinking") is False else 9]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["t"] * len(ids)


def test_both_trl_routes_render_chat_prompts_with_the_trainers_chat_template_kwargs():
    """One renderer (adapters.common.translate): the async worker used to drop ``chat_template_kwargs``."""
    from rollout_plugin.adapters.trl.rollout import make_rollout_func

    chat = [{"role": "user", "content": "hi"}]
    kwargs = {"enable_thinking": False}
    sent: list[Request] = []

    def generate(requests):
        sent.extend(requests)
        return [Result(r.id, samples=tuple(Sample("x", (5,), (-0.1,)) for _ in range(r.n))) for r in requests]

    pool = SimpleNamespace(generate=generate)
    args = SimpleNamespace(chat_template_kwargs=kwargs, max_completion_length=4, temperature=1.0)
    trainer = SimpleNamespace(processing_class=_ThinkingTokenizer(), args=args, num_generations=2,
                              model=SimpleNamespace(training=True), accelerator=_one_process())
    callback = SimpleNamespace(trainer=trainer, weights=None, pool=pool)
    out = make_rollout_func(callback)([chat, chat], trainer)
    assert out["prompt_ids"] == [[1, 0], [1, 0]] and [r.prompt for r in sent] == [[1, 0]]

    worker = _worker(_ThinkingTokenizer(), in_flight=1, chat_template_kwargs=kwargs)
    worker.pool = SimpleNamespace(run=lambda fn: object())  # _fill only submits: no pool loop needed
    worker._fill(iter([{"prompt": chat}]))
    assert [ids for _, ids in worker._rows.values()] == [[1, 0]]


def test_trls_own_staleness_drop_judges_a_spanning_group_by_its_oldest_token(monkeypatch):
    import collections
    import logging
    import queue

    from trl.experimental.async_grpo import async_grpo_trainer
    from trl.experimental.async_grpo.async_grpo_trainer import RolloutQueueDataset

    # TRL logs through accelerate's logger, which needs an accelerate state this process has no use for.
    monkeypatch.setattr(async_grpo_trainer, "logger", logging.getLogger("trl.async_grpo"))

    worker = _worker()
    old = worker._score({"prompt": "p"}, [3], _spanning_group("old"))  # 7 of 8 tokens fresh: mean version 4.6
    fresh = worker._score({"prompt": "q"}, [3], Result("new", samples=_spanning_group().samples[1:] * 2,
                                                       weight_version=5))
    assert {s.model_version for s in old} == {2} and {s.model_version for s in fresh} == {5}
    assert [s.metrics["rollout_pool/versions_spanned"] for s in old] == [2.0, 1.0]
    q: queue.Queue = queue.Queue()
    for s in old + fresh:
        q.put(s)
    metrics = collections.defaultdict(list)
    rows = iter(RolloutQueueDataset(q, lambda: 5, lambda s: None, 60.0, metrics, max_staleness=2))
    first = next(rows)
    # Trainer at version 5, max_staleness 2: the whole spanning group goes (staleness 3), the fresh one stays.
    assert first["group_id"] == fresh[0].group_id and metrics["sample/dropped_stale_total"] == [1.0, 1.0]


def test_async_settings_are_checked_together_with_the_fix():
    from rollout_plugin.adapters.trl.async_worker import PoolWeightTransfer
    from rollout_plugin.adapters.trl.config import AsyncRolloutConfig

    with pytest.raises(ConfigError) as err:
        _worker(in_flight=0, update_mode="abort", max_staleness=-1)
    assert [p.key for p in err.value.problems] == ["in_flight", "max_staleness", "update_mode"]
    assert "try update_mode=continue" in str(err.value)
    with pytest.raises(ConfigError, match=r"in_flght=4: not a setting of the async route \(try in_flight=…\)"):
        _worker(in_flght=4)
    transfer = PoolWeightTransfer(None, "w", config=AsyncRolloutConfig(max_staleness=2))
    assert (transfer.mode, transfer.max_staleness) == ("continue", 2)  # the documented default mode
    assert PoolWeightTransfer(None, "w", update_mode="keep").mode == "keep"


# -- the async worker's carry-over, over a real pool and in-memory engines ------------------------------------------

SHORT, HALF, LONG = 3, 5, 10  # tokens: fast prompts; where slow ones stop under the first weights; slow prompts


def _carry_engine():
    from vllm_like import STEP_S, VllmLike

    from rollout_plugin.pool.core.engine_client import Generation

    class CarryEngine(VllmLike):
        """Prompt ``[m, *tokens so far]``: m % 4 == 0 is slow (LONG tokens), else fast (SHORT). A slow sample
        stops at token HALF while the engine holds its first weights, until a weight update aborts it. Token =
        1000 × weights + position; each logprob says the weights too."""

        async def generate(self, requests, progress=None, weight_version=None):
            (r,) = requests  # pack_size=1
            base = len(r.prompt) - 1
            slow = isinstance(r.prompt, list) and r.prompt[0] % 4 == 0
            budget = min(r.sampling.max_tokens, (LONG if slow else SHORT) - base)
            outs = [[] for _ in range(r.n)]
            for step in range(budget):
                if slow and self.weights == 0 and base + step == HALF:
                    await self._hold()
                await self._gate()
                if self._abort.is_set():
                    return self._answer(r, outs, "abort")
                await asyncio.sleep(STEP_S)
                for j in range(r.n):
                    outs[j].append(1000 * self.weights + base + step)
                    self.generated += 1
                    if progress is not None:
                        progress[0][j].token_ids.append(outs[j][-1])
                        progress[0][j].logprobs = [-1.0 - t // 1000 for t in progress[0][j].token_ids]
            return self._answer(r, outs, "length")

        async def _hold(self) -> None:
            """Until the weights change (keep) or the call is aborted (continue); at most 20 s, so that an update
            that waits for it (drain) fails the test instead of hanging it."""
            self.held += 1
            if self.held == 3:
                self.three_held.set()  # (a threading.Event: the test thread waits on it)
            waits = [asyncio.ensure_future(self._abort.wait()), asyncio.ensure_future(self.reloaded.wait())]
            await asyncio.wait(waits, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

        async def admin(self, path, body=None, **kwargs):
            answer = await super().admin(path, body, **kwargs)
            if path == "/collective_rpc":
                self.reloaded.set()
            return answer

        def _answer(self, r, outs, finish):
            return [Generation(tuple(Sample("", tuple(t), tuple(-1.0 - x // 1000 for x in t), finish) for t in outs),
                               len(r.prompt), tuple(r.prompt))]

    import asyncio
    import threading

    engine = CarryEngine("e0")
    engine.held, engine.three_held, engine.reloaded = 0, threading.Event(), asyncio.Event()
    return engine


class _MarkerTokenizer:
    """``"p7"`` -> ``[7]``: the engine reads the prompt's marker."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(text[1:])]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, x)) for x in ids]


def _take_groups(buffer, count: int, k: int) -> list[list]:
    """``count`` whole groups from the worker's queue, in the order they were queued."""
    out: list[list] = []
    for _ in range(count * k):
        s = buffer.get(timeout=30)
        if out and out[-1][0].group_id == s.group_id:
            out[-1].append(s)
        else:
            out.append([s])
    assert all(len(g) == k for g in out), [len(g) for g in out]
    return out


@pytest.mark.parametrize("mode,max_staleness", [("continue", None), ("keep", None), ("continue", 0)])
def test_the_async_worker_queues_groups_as_they_finish_and_carries_the_rest_across_a_weight_update(
        tmp_path, mode, max_staleness):
    from rollout_plugin import PoolConfig, SyncRolloutPool
    from rollout_plugin.adapters.trl.async_worker import PoolRolloutWorker, PoolWeightTransfer
    from rollout_plugin.config.schema import ControllerConfig, ControllerMode

    k, in_flight = 2, 3
    engine = _carry_engine()
    engine.folders = {str(tmp_path.resolve()): 1}
    data = [{"prompt": f"p{i}", "answer": str(i)} for i in range(12)]  # slow: p0, p4, p8
    cfg = PoolConfig(per_engine=16, over_concurrency_ratio=1.0, pack_size=1)
    with SyncRolloutPool(pool=cfg, controller=ControllerConfig(mode=ControllerMode.off), clients=[engine]) as pool:
        worker = PoolRolloutWorker(pool, data, [lambda prompts, completions, completion_ids, **kw: [1.0] * len(
            completions)], _MarkerTokenizer(), num_generations=k, sampling=SamplingParams(max_tokens=LONG),
            in_flight=in_flight, queue_maxsize=256)
        transfer = PoolWeightTransfer(pool, tmp_path, update_mode=mode, max_staleness=max_staleness)
        worker.start()
        try:
            # p0 went first; every fast group finishes and is queued while the slow ones hold their slots.
            before = _take_groups(worker.rollout_buffer, 6, k)
            assert [g[0].prompt for g in before] == ["p1", "p2", "p3", "p5", "p6", "p7"]
            assert engine.three_held.wait(30)  # p0, p4, p8 are HALF-way, their slots taken
            transfer.send_weights(iter([("w", torch.zeros(1))]))  # they go on under version 1
            carried = _take_groups(worker.rollout_buffer, 3, k)  # their slots were full: nothing else started
        finally:
            worker.stop()
        assert worker._error is None and pool.weight_version == 1
    assert sorted(g[0].prompt for g in carried) == ["p0", "p4", "p8"]
    for group in carried:
        for s in group:
            tokens = s.input_ids[1:].tolist()
            assert [t % 1000 for t in tokens] == list(range(LONG))  # nothing lost, nothing doubled
            weights = [t // 1000 for t in tokens]
            if max_staleness is None:  # carried over: its first HALF tokens from version 0, the rest from 1
                assert weights == [0] * HALF + [1] * (LONG - HALF) and s.model_version == 0
                assert s.metrics["rollout_pool/versions_spanned"] == 2.0
            else:  # max_staleness=0: version-0 work starts over under version 1
                assert weights == [1] * LONG and s.model_version == 1
            assert s.old_log_probs[1:].tolist() == [-1.0 - w for w in weights]  # logprobs cover every token
    rest = []
    while not worker.rollout_buffer.empty():
        rest.append(worker.rollout_buffer.get_nowait())
    samples = [s for g in before + carried for s in g] + rest
    ids = [s.group_id for s in samples]
    assert sorted(set(ids)) == list(range(worker.groups_out)) and len(ids) == worker.groups_out * k  # none doubled
    assert worker.failed == 0 and 0 <= worker.submitted - worker.groups_out <= in_flight  # none lost
    assert all(s.model_version == 1 for s in rest)
