"""GPU placement of launched engines, on a fake GPU inventory (an ``nvidia-smi`` shim, or an inventory object).

Each engine gets its own ``tensor_parallel_size`` GPUs, never the trainer's unless colocated; impossible
layouts are refused in one line naming the key, before any engine starts.
"""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from pathlib import Path

import pytest

from rollout_plugin.config.schema import CollectConfig, EngineConfig, PoolBackend, PoolConfig
from rollout_plugin.config.validate import validate_collect
from rollout_plugin.errors import ConfigError, EngineError
from rollout_plugin.pool.engines.placement import DEDICATED_UTILIZATION, GpuInventory, gpu_inventory, place_engines
from rollout_plugin.pool.engines.provider import LocalEngines, _colocated_utilization
from rollout_plugin.pool.engines.ray_backend import check_ray_gpus
from rollout_plugin.tuning import HARDWARE_PRESETS, MODEL_PRESETS, colocated_utilization

EIGHT = GpuInventory(tuple(str(i) for i in range(8)), "nvidia-smi", 79.6)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def smi_path(tmp_path, monkeypatch):
    """PATH holding only a fake ``nvidia-smi`` that reports four 80 GB GPUs."""
    shim = tmp_path / "bin"
    shim.mkdir()
    _executable(shim / "nvidia-smi", "#!/bin/sh\nprintf '0, 81559\\n1, 81559\\n2, 81559\\n3, 40960\\n'\n")
    monkeypatch.setenv("PATH", str(shim))
    return shim


def _refused(inventory: GpuInventory, engines: int = 1, **engine) -> str:
    with pytest.raises(ConfigError) as info:
        place_engines(inventory, EngineConfig(**engine), engines)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_inventory_from_nvidia_smi(smi_path):
    inv = gpu_inventory({})
    assert inv.devices == ("0", "1", "2", "3") and inv.source == "nvidia-smi"
    assert inv.memory_gib == 40.0  # the smallest GPU sizes a colocated fraction


def test_an_existing_cuda_visible_devices_wins(smi_path):
    inv = gpu_inventory({"CUDA_VISIBLE_DEVICES": "2,3"})
    assert inv.devices == ("2", "3") and inv.source == "CUDA_VISIBLE_DEVICES"
    assert inv.memory_gib == 40.0  # GPUs 2 and 3: the smaller is 3's
    assert gpu_inventory({"CUDA_VISIBLE_DEVICES": ""}).devices == ()
    assert gpu_inventory({"CUDA_VISIBLE_DEVICES": "-1"}).devices == ()


def test_no_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_inventory({}) == GpuInventory((), "no nvidia-smi")


@pytest.mark.parametrize("engines,tp", [(8, 1), (4, 2), (2, 4), (1, 8), (3, 2), (2, 1)])
def test_engines_get_disjoint_device_sets_of_tp_gpus(engines, tp):
    placed = place_engines(EIGHT, EngineConfig(tensor_parallel_size=tp), engines)
    sets = placed.devices
    assert len(sets) == engines and all(len(s) == tp for s in sets)
    flat = [d for s in sets for d in s]
    assert len(flat) == len(set(flat)) == engines * tp
    assert placed.env(0) == {"CUDA_VISIBLE_DEVICES": ",".join(sets[0])}
    assert placed.gpu_memory_utilization == DEDICATED_UTILIZATION


def test_the_trainers_gpus_are_left_out():
    placed = place_engines(EIGHT, EngineConfig(trainer_devices=["0", "1"], tensor_parallel_size=2), 3)
    assert placed.devices == (("2", "3"), ("4", "5"), ("6", "7"))
    assert "trainer's GPU 0,1 left out" in placed.summary


def test_explicit_devices_in_the_order_given():
    placed = place_engines(EIGHT, EngineConfig(devices=["6", "7", "4", "5"]), 2)
    assert placed.devices == (("6",), ("7",))
    assert "unused: 4,5" in placed.summary


def test_shortage_names_pool_engines_with_what_fits():
    text = _refused(EIGHT, 4, trainer_devices=["0", "1"], tensor_parallel_size=2)
    assert text.startswith("pool.engines=4: 4 engines × engine.tensor_parallel_size 2 need 8 GPUs")
    assert "6 usable" in text and "(try pool.engines=3)" in text


def test_a_tp_larger_than_the_gpus_names_tensor_parallel_size():
    text = _refused(GpuInventory(("0", "1"), "nvidia-smi"), tensor_parallel_size=4)
    assert text.startswith("engine.tensor_parallel_size=4: one engine needs 4 GPUs") and "try engine.tensor_parallel_size=2" in text


def test_overlap_with_the_trainer_is_refused():
    text = _refused(EIGHT, 2, devices=["0", "1"], trainer_devices=["1"])
    assert text.startswith("engine.devices=['0', '1']: GPU 1 also in engine.trainer_devices")
    assert "engine.colocate=true" in text


def test_tp_must_divide_the_listed_devices():
    text = _refused(EIGHT, 1, devices=["0", "1", "2"], tensor_parallel_size=2)
    assert "engine.devices=['0', '1', '2']: 3 GPUs do not split into engines of engine.tensor_parallel_size=2" in text
    assert "try engine.devices=[0,1]" in text


def test_duplicate_and_invisible_ids_are_refused_together():
    text = _refused(GpuInventory(("0", "1"), "CUDA_VISIBLE_DEVICES"), 1, devices=["1", "1"],
                    trainer_devices=["5"])
    assert "engine.devices=['1', '1']: lists GPU 1 more than once" in text
    assert "engine.trainer_devices=['5']: GPU 5 not visible here (visible: 0,1 from CUDA_VISIBLE_DEVICES)" in text


def test_cuda_visible_devices_in_engine_env_is_refused():
    text = _refused(EIGHT, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert text.startswith("engine.env.CUDA_VISIBLE_DEVICES='3'") and "engine.devices=[3]" in text


def test_cpu_engines_keep_their_environment():
    placed = place_engines(GpuInventory(), EngineConfig(), 2)
    assert placed.devices == (None, None) and placed.env(1) == {}
    assert "engine.devices" in _refused(GpuInventory((), "no nvidia-smi"), devices=["0"])


def test_colocated_engines_share_the_trainers_gpus_at_the_planners_fraction():
    cfg = EngineConfig(trainer_devices=["0", "1"], colocate=True)
    placed = place_engines(EIGHT, cfg, 2, colocated_utilization=0.55)
    assert placed.devices == (("0",), ("1",)) and placed.gpu_memory_utilization == 0.55
    # Asked for colocation but nothing to size it by: the user must say.
    assert _refused(EIGHT, 2, trainer_devices=["0", "1"], colocate=True).startswith(
        "engine.gpu_memory_utilization=None: unset with engine.colocate=true")
    # A user's value wins over the planner's.
    mine = place_engines(EIGHT, EngineConfig(trainer_devices=["0"], colocate=True, gpu_memory_utilization=0.4), 1,
                         colocated_utilization=0.55)
    assert mine.gpu_memory_utilization == 0.4


def test_the_colocated_fraction_is_the_planners(tmp_path):
    m = MODEL_PRESETS["qwen2.5-7b"]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "intermediate_size": m.intermediate_size, "vocab_size": m.vocab_size, "torch_dtype": "bfloat16"}))
    cfg = EngineConfig(trainer_devices=["0", "1"], colocate=True)
    util = _colocated_utilization(cfg, str(tmp_path), EIGHT)
    from rollout_plugin.tuning import load_hf_config

    hw = HARDWARE_PRESETS["h100-80"]
    expected, _ = colocated_utilization(load_hf_config(str(tmp_path)), hw, 2, offload=False)
    assert util == expected and 0.5 <= util <= 0.7
    assert _colocated_utilization(EngineConfig(), str(tmp_path), EIGHT) is None  # dedicated: not asked


def test_validate_collect_refuses_placement_problems_with_the_rest():
    cfg = CollectConfig(engine=EngineConfig(devices=["0", "0"], trainer_devices=["0"]),
                        pool=PoolConfig(engines=3, backend=PoolBackend.ray))
    with pytest.raises(ConfigError) as info:
        validate_collect(cfg)
    keys = [p.key for p in info.value.problems]
    assert keys.count("engine.devices") >= 3 and "pool.engines" in keys  # duplicate, overlap, ray; 3 > 1 GPU


def _fake_python(tmp_path: Path) -> Path:
    """Stands in for the vLLM server: prints the GPUs it was given and exits (its log holds the line)."""
    return _executable(tmp_path / "fake-python", "#!/bin/sh\necho \"GPUS=${CUDA_VISIBLE_DEVICES-unset}\"\nexit 3\n")


def test_each_launched_engine_sees_only_its_own_gpus(tmp_path):
    cfg = EngineConfig(model=str(tmp_path), python=str(_fake_python(tmp_path)), trainer_devices=["0"],
                       log_dir=str(tmp_path / "logs"), startup_timeout_s=30)
    engines = LocalEngines(cfg, inventory=GpuInventory(("0", "1", "2"), "nvidia-smi", 80.0))

    async def run() -> None:
        with pytest.raises(EngineError, match="exited with code 3"):
            await engines.start(2, max_num_seqs=8)

    try:
        asyncio.run(run())
    finally:
        engines.close()
    seen = sorted(line for log in (tmp_path / "logs").glob("engine*.log") for line in log.read_text().split()
                  if line.startswith("GPUS="))
    assert seen == ["GPUS=1", "GPUS=2"]
    assert all("--gpu-memory-utilization 0.9" in " ".join(p.command) for p in engines.processes)


def test_an_impossible_layout_starts_nothing(tmp_path):
    cfg = EngineConfig(model=str(tmp_path), python=str(_fake_python(tmp_path)), devices=["0", "1"],
                       trainer_devices=["1"], log_dir=str(tmp_path / "logs"))
    engines = LocalEngines(cfg, inventory=GpuInventory(("0", "1"), "nvidia-smi", 80.0))
    with pytest.raises(ConfigError, match="engine.devices"):
        asyncio.run(engines.start(1, max_num_seqs=8))
    assert engines.processes == [] and not (tmp_path / "logs").exists()


def test_ray_replicas_must_see_exactly_their_own_gpus():
    check_ray_gpus("engine0", [], None, 1)  # CPU replica
    check_ray_gpus("engine0", [2, 3], "2,3", 2)
    with pytest.raises(EngineError, match="engine.tensor_parallel_size=2 needs 2"):
        check_ray_gpus("engine0", [2], "2", 2)
    with pytest.raises(EngineError, match="not this replica's GPUs"):
        check_ray_gpus("engine1", [3], "0,1,2,3", 1)



def test_a_trainer_already_on_cuda_without_declared_gpus_is_flagged(monkeypatch):
    from types import SimpleNamespace

    from rollout_plugin.pool.engines.provider import _trainer_here_undeclared

    fake = SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert _trainer_here_undeclared(EngineConfig(), EIGHT)
    assert not _trainer_here_undeclared(EngineConfig(trainer_devices=["0"]), EIGHT)
    assert not _trainer_here_undeclared(EngineConfig(colocate=True), EIGHT)
    assert not _trainer_here_undeclared(EngineConfig(), GpuInventory())  # CPU engines
    fake.cuda.is_initialized = lambda: False
    assert not _trainer_here_undeclared(EngineConfig(), EIGHT)


def test_one_cause_one_line():
    with pytest.raises(ConfigError) as info:
        place_engines(EIGHT, EngineConfig(devices=["0", "1"], tensor_parallel_size=4), 1)
    assert [p.key for p in info.value.problems] == ["engine.tensor_parallel_size"]
    with pytest.raises(ConfigError) as info:
        place_engines(EIGHT, EngineConfig(devices=["0", "1"]), 3)
    assert [str(p) for p in info.value.problems] == [
        "pool.engines=3: 3 engines × engine.tensor_parallel_size 1 need 3 GPUs; engine.devices lists 2 "
        "(try pool.engines=2)"]
