"""The embedded tiny model: paths, the build script (deterministic, atomic, cached) and errors."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rollout_plugin.config.schema import EMBEDDED_MODEL
from rollout_plugin.errors import EngineError
from rollout_plugin.model import embedded
from rollout_plugin.model.embedded import (
    BUILD_SCRIPT,
    cache_dir,
    embedded_model_dir,
    ensure_embedded_model,
    resolve_model,
)


_real_run = subprocess.run  # forbid_subprocess() patches the shared subprocess module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_build(out: Path, seed: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BUILD_SCRIPT), "--out", str(out), "--seed", str(seed)]
    proc = _real_run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def forbid_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("ensure_embedded_model ran a build although the model exists")

    monkeypatch.setattr(embedded.subprocess, "run", boom)


# --- no torch needed -----------------------------------------------------------------------------


def test_cache_dir_and_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUT_PLUGIN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert embedded_model_dir() == tmp_path / "models" / "tiny-llama-v1-seed0"
    assert embedded_model_dir(3).name == "tiny-llama-v1-seed3"
    monkeypatch.delenv("ROLLOUT_PLUGIN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rollout_plugin"


def test_resolve_model_passes_other_models_through(monkeypatch):
    forbid_subprocess(monkeypatch)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model("/some/dir") == "/some/dir"


def test_existing_model_is_returned_without_a_build(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUT_PLUGIN_CACHE", str(tmp_path))
    out = embedded_model_dir()
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    forbid_subprocess(monkeypatch)
    assert ensure_embedded_model(python="/nonexistent/python") == out
    assert resolve_model(EMBEDDED_MODEL) == str(out)


def test_failed_build_raises_engine_error_with_stderr_tail(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUT_PLUGIN_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(EngineError, match=r"exit 3.*No module named torch"):
        ensure_embedded_model(python=str(fake))
    with pytest.raises(EngineError, match="not found"):
        ensure_embedded_model(python=str(tmp_path / "missing-python"))
    assert not embedded_model_dir().exists()


# --- real builds (torch + transformers + tokenizers in this interpreter) -------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The embedded model built once through ensure_embedded_model into a private cache."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROLLOUT_PLUGIN_CACHE", str(cache))
        out = ensure_embedded_model(python=sys.executable)
    assert out == cache / "models" / "tiny-llama-v1-seed0"
    return out


@pytest.mark.engine
def test_built_model_loads_with_transformers(built):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in built.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert not list(built.parent.glob(".*.tmp-*")), "temporary build dir left behind"

    config = AutoConfig.from_pretrained(built)
    assert config.model_type == "llama"
    assert config.head_dim == 64
    assert config.hidden_size == config.num_attention_heads * config.head_dim

    tok = AutoTokenizer.from_pretrained(built)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert config.vocab_size == len(tok)
    assert 2048 <= len(tok) <= 4096
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    text = "What is 37 + 45? The answer is 82."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>\nBe brief.\n<|user|>\nWhat is 2 + 3?\n<|assistant|>\n"
    full = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": "The answer is 5."}], tokenize=False)
    assert full == prompt + "The answer is 5.<|eos|>"  # prompt + generation == whole conversation
    assert json.loads((built / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.engine
def test_second_ensure_does_not_rebuild(built, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    monkeypatch.setenv("ROLLOUT_PLUGIN_CACHE", str(built.parent.parent))
    forbid_subprocess(monkeypatch)
    assert ensure_embedded_model(python=sys.executable) == built
    assert resolve_model(EMBEDDED_MODEL) == str(built)
    # The script itself also leaves an existing model alone.
    assert run_build(built, 0).stdout.strip().splitlines()[-1] == str(built)
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


@pytest.mark.engine
def test_build_is_deterministic_by_seed(built, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert run_build(again, 0).stdout.strip().splitlines()[-1] == str(again)
    run_build(other, 1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert sha256(again / name) == sha256(built / name), name
    assert sha256(other / "model.safetensors") != sha256(built / "model.safetensors")
    assert sha256(other / "tokenizer.json") == sha256(built / "tokenizer.json")  # one tokenizer


@pytest.mark.engine
def test_concurrent_builders_share_one_build(built, tmp_path):
    out = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: run_build(out, 0), range(2)))
    assert all(p.stdout.strip().splitlines()[-1] == str(out) for p in procs)
    assert sha256(out / "model.safetensors") == sha256(built / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]
    assert os.access(out / "model.safetensors", os.R_OK)
