"""TRL on two CPU ranks (``accelerate launch --num_processes 2``, gloo) through one rollout pool: DDP, FSDP2
and DeepSpeed ZeRO-3.

Each job runs tests/trl_multirank_job.py — the README's ``make_pool`` + ``attach`` lines — attached to the
session's engine. Checked: exactly one pool (rank 0's); every rank took part in each weight sync and
got the same records; the written safetensors hold full HF-shaped tensors (not shards, not empty);
the engine then serves the trained weights (its logprobs match the trained model's within bf16
tolerance, and not the initial model's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from rollout_plugin import EngineConfig, PoolConfig, SyncRolloutPool  # noqa: E402
from rollout_plugin.pool.engines.launcher import reserve_ports  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BF16_TOL = 0.05  # nats: engine (bf16 weights) vs trainer (fp32) on the same tokens
STEPS = 2
JOB_TIMEOUT_S = 420
# accelerate's `--cpu` runs one process unless it has an MPI hostfile: torchrun's launchers (--multi_gpu,
# --use_fsdp) start the two ranks, and make_pool forms the CPU (gloo) group on a machine without a GPU.
LAUNCH = {
    "ddp": ["--multi_gpu"],
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_reshard_after_forward", "true",
              "--fsdp_state_dict_type", "FULL_STATE_DICT"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false", "--offload_param_device", "none",
              "--offload_optimizer_device", "none"],
}


@pytest.fixture(scope="module")
def engine(live_engine):
    """The session's engine; its original weights are put back when the module is done."""
    from rollout_plugin.adapters.common.weights import reload_engines

    yield live_engine
    eng = EngineConfig(urls=[live_engine.url], api_key=live_engine.api_key, max_model_len=1024)
    with SyncRolloutPool(eng, PoolConfig()) as pool:
        pool.run(lambda p: reload_engines(p, live_engine.model_dir, 0))


def run_job(kind: str, engine, out: Path) -> tuple[list[dict], str]:
    (port,) = reserve_ports("127.0.0.1", 0, 1)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), *LAUNCH[kind], str(ROOT / "tests/trl_multirank_job.py")]
    env = {**os.environ, "RP_ENGINE_URL": engine.url, "RP_ENGINE_KEY": engine.api_key, "RP_MODEL_DIR": engine.model_dir,
           "RP_OUT": str(out), "RP_STEPS": str(STEPS), "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    # Its own session: a hung collective is ended with every rank, not just accelerate's launcher.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{kind} job still running after {JOB_TIMEOUT_S}s: {log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], log


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "zero3"])
def test_two_ranks_one_pool_gathered_weights_reach_the_engine(kind, engine, tmp_path):
    from safetensors import safe_open

    if kind == "zero3":
        pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    reports, log = run_job(kind, engine, tmp_path)
    # Exactly one pool in the job: rank 0's.
    assert [r["pool"] for r in reports] == [True, False]
    # Every rank took part in every sync (version 0 = the initial push) and got the main process's records.
    versions = list(range(STEPS + 1))
    for r in reports:
        assert [h["version"] for h in r["history"]] == versions
        assert r["history"] == reports[0]["history"]
        assert all(h["ranks"] == 2 and h["sharding"] == kind for h in r["history"])
    assert "weights: version 1 -> 2 (folder: gather" in log and f"on 2 rank(s) [{kind}]" in log

    # What was written is the whole model, under HF's names and shapes: no shard, no empty tensor.
    with safe_open(str(tmp_path / "weights/model.safetensors"), "pt") as mine, \
            safe_open(str(Path(engine.model_dir) / "model.safetensors"), "pt") as orig:
        assert set(mine.keys()) == set(orig.keys())
        for key in orig.keys():
            shape = mine.get_slice(key).get_shape()
            assert shape == orig.get_slice(key).get_shape() and all(shape), key

    # The engine serves the trained weights: its logprobs match the trained model's, not the initial one's.
    main, other = reports
    assert main["engine_version"] == STEPS
    assert max(abs(a - b) for a, b in zip(main["engine_lp"], main["trainer_lp"])) < BF16_TOL
    assert max(abs(a - b) for a, b in zip(main["trainer_lp"], other["trainer_lp"])) < 1e-4  # one model, two ranks
    base = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    ids = torch.tensor([main["prompt"] + main["tokens"]])
    with torch.no_grad():
        logits = base(ids).logits[0, len(main["prompt"]) - 1:-1]
    base_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(main["tokens"])[:, None])[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(main["engine_lp"], base_lp)) > 5 * BF16_TOL
