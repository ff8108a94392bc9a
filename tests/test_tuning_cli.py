"""`rollout-plugin plan …` end to end in-process: Hydra composition, presets, model.path, emit formats."""

from __future__ import annotations

import json

import pytest

from rollout_plugin.cli.main import main
from rollout_plugin.tuning import HARDWARE_PRESETS, MODEL_PRESETS


@pytest.mark.parametrize("hardware", sorted(HARDWARE_PRESETS))
@pytest.mark.parametrize("model", sorted(MODEL_PRESETS))
def test_plan_runs_for_every_model_and_hardware_preset(model, hardware, capsys):
    rc = main(["plan", f"model={model}", f"hardware={hardware}", "emit=all"])
    out, err = capsys.readouterr()
    if rc == 0:
        assert out.startswith("## settings\nplan: " + model)
        for section in ("## verl overrides", "## vLLM server", "## rollout-plugin engine/pool config"):
            assert section in out
    else:
        # A combination that cannot work is refused with one line per problem, never a traceback.
        assert rc == 2 and err.startswith("rollout-plugin plan: error: ") and "Traceback" not in err
        assert "(try " in err


def test_plan_headline_example(capsys):
    assert main(["plan", "model=qwen2.5-7b", "hardware=h100-80", "hardware.gpus_per_node=8", "workload.n=8"]) == 0
    out = capsys.readouterr().out
    assert "engine.tensor_parallel_size" in out and "pool.max_concurrent" in out


def test_emit_verl_is_pasteable(capsys):
    assert main(["plan", "model=qwen2.5-1.5b", "hardware=a100-80", "hardware.gpus_per_node=4", "emit=verl"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# paste after `python -m verl.trainer.main_ppo`")
    overrides = [ln.strip().rstrip(" \\") for ln in lines[1:]]
    assert all("=" in o and not o.startswith("+") for o in overrides)
    assert "trainer.n_gpus_per_node=4" in overrides and lines[-1].endswith("=4")


def test_model_path_reads_an_hf_config(tmp_path, capsys):
    cfg = {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
           "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768,
           "torch_dtype": "bfloat16", "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", f"model.path={tmp_path}", "hardware=l40s-48", "emit=pool"]) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path}" in out and "engines: 8" in out


def test_unknown_preset_and_bad_values_are_friendly(capsys):
    assert main(["plan", "model=qwen2.5-7", "hardware=h100"]) == 2
    err = capsys.readouterr().err
    assert "model='qwen2.5-7': unknown preset" in err and "(try model=qwen2.5-7b)" in err
    assert "hardware='h100': unknown preset" in err and "(try hardware=h100-80)" in err

    assert main(["plan", "pin.gpu_memory_utilization=1.5", "workload.ppo_mini_batch_size=512"]) == 2
    err = capsys.readouterr().err
    assert "pin.gpu_memory_utilization=1.5" in err and "workload.ppo_mini_batch_size=512" in err

    assert main(["plan", "workload.placment=dedicated"]) == 2
    assert "workload.placement" in capsys.readouterr().err


def test_field_overrides_win_over_the_preset(capsys):
    assert main(["plan", "model=qwen2.5-7b", "model.max_position_embeddings=4096",
                 "workload.max_prompt_length=2048", "workload.max_response_length=4096"]) == 2
    assert "context of 4096 tokens" in capsys.readouterr().err
