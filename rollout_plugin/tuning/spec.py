"""What the planner is told: the model, the hardware and the workload, as frozen dataclasses.

Presets carry figures from the models' public ``config.json`` files and the memory that
``nvidia-smi`` reports for each GPU. :func:`model_from_hf_config` turns a parsed ``config.json``
(a dict: the caller reads the file) into a :class:`ModelSpec`; reading the file is
:mod:`rollout_plugin.tuning.loader`'s job, so everything here stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from rollout_plugin.errors import ConfigError, ConfigProblem

DType = Literal["bfloat16", "float16", "float32", "fp8"]
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}

GIB = 1024**3


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as far as memory is concerned."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: int
    max_position_embeddings: int
    dtype: DType = "bfloat16"
    tie_word_embeddings: bool = False
    # What trainers and vLLM load: a hub id for presets, a directory for models read from disk.
    path: str = ""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    gpu_memory_gib: float  # per device, as nvidia-smi reports it (not the marketing figure)
    gpus_per_node: int
    nodes: int = 1
    kind: Literal["gpu", "cpu"] = "gpu"
    # Datasheet peaks per device, for the throughput estimate (tuning.throughput); unset: no estimate.
    memory_bandwidth_gbs: Optional[float] = None  # GB/s (10^9 B/s)
    bf16_tflops: Optional[float] = None  # dense

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class WorkloadSpec:
    """One RL job's shape. Batch sizes count prompts, as verl's ``data.train_batch_size`` does."""

    max_prompt_length: int = 1024
    max_response_length: int = 1024
    n: int = 8  # samples per prompt (GRPO group size)
    train_batch_size: int = 256
    ppo_mini_batch_size: int = 64
    placement: Literal["colocated", "dedicated"] = "colocated"
    # Dedicated placement: GPUs given to rollout engines; the rest train. Unset: half of all GPUs.
    rollout_gpus: Optional[int] = None
    offload: bool = False  # FSDP parameter and optimizer offload to CPU
    adv_estimator: Literal["grpo", "gae"] = "grpo"  # gae trains a critic

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_length + self.max_response_length


@dataclass(frozen=True)
class Pins:
    """Values the user fixes; the planner fills only what is left unset (user-set values win)."""

    gpu_memory_utilization: Optional[float] = None
    tensor_parallel_size: Optional[int] = None
    max_num_seqs: Optional[int] = None
    ulysses_sp: Optional[int] = None
    over_concurrency_ratio: float = 1.2


def estimate_params(*, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    intermediate_size: int, vocab_size: int, tie_word_embeddings: bool,
                    qkv_bias: bool = False) -> int:
    """Parameter count of a Llama/Qwen-style decoder (gated MLP, GQA), to within a percent or so."""
    q = hidden_size * num_heads * head_dim
    kv = 2 * hidden_size * num_kv_heads * head_dim
    o = num_heads * head_dim * hidden_size
    bias = (num_heads + 2 * num_kv_heads) * head_dim if qkv_bias else 0
    mlp = 3 * hidden_size * intermediate_size
    norms = 2 * hidden_size
    embed = vocab_size * hidden_size
    return num_layers * (q + kv + o + bias + mlp + norms) + embed * (1 if tie_word_embeddings else 2) + hidden_size


def _preset(name: str, path: str, *, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int,
            ctx: int, params: int, tie: bool = False, head_dim: int | None = None) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                     head_dim=head_dim or hidden // heads, intermediate_size=inter, vocab_size=vocab,
                     num_params=params, max_position_embeddings=ctx, tie_word_embeddings=tie, path=path)


# Figures from each model's config.json on the Hugging Face hub; parameter counts as the model cards state.
MODEL_PRESETS: dict[str, ModelSpec] = {m.name: m for m in (
    _preset("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", layers=24, hidden=896, heads=14, kv=2, inter=4864,
            vocab=151936, ctx=32768, params=494_000_000, tie=True),
    _preset("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", layers=28, hidden=1536, heads=12, kv=2, inter=8960,
            vocab=151936, ctx=32768, params=1_544_000_000, tie=True),
    _preset("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", layers=28, hidden=3584, heads=28, kv=4, inter=18944,
            vocab=152064, ctx=32768, params=7_616_000_000),
    _preset("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", layers=64, hidden=5120, heads=40, kv=8, inter=27648,
            vocab=152064, ctx=32768, params=32_764_000_000),
    _preset("qwen3-8b", "Qwen/Qwen3-8B", layers=36, hidden=4096, heads=32, kv=8, inter=12288, vocab=151936,
            ctx=40960, params=8_191_000_000, head_dim=128),
    _preset("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", layers=32, hidden=4096, heads=32, kv=8,
            inter=14336, vocab=128256, ctx=131072, params=8_030_000_000),
    _preset("llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", layers=80, hidden=8192, heads=64, kv=8,
            inter=28672, vocab=128256, ctx=131072, params=70_554_000_000),
)}

# Usable memory per device as nvidia-smi reports it (MiB / 1024); the CPU preset is a KV/weights budget in RAM.
# Bandwidth and dense bf16 TFLOP/s from NVIDIA's datasheets (SXM parts; L40S: PCIe); the CPU's are a
# typical dual-channel DDR5 desktop's and AVX-512 cores', rough.
HARDWARE_PRESETS: dict[str, HardwareSpec] = {h.name: h for h in (
    HardwareSpec("a100-40", 40.0, 8, memory_bandwidth_gbs=1555, bf16_tflops=312),
    HardwareSpec("a100-80", 80.0, 8, memory_bandwidth_gbs=2039, bf16_tflops=312),
    HardwareSpec("h100-80", 79.6, 8, memory_bandwidth_gbs=3350, bf16_tflops=989),
    HardwareSpec("h200-141", 140.4, 8, memory_bandwidth_gbs=4800, bf16_tflops=989),
    HardwareSpec("l40s-48", 45.0, 8, memory_bandwidth_gbs=864, bf16_tflops=362),
    HardwareSpec("cpu", 32.0, 1, kind="cpu", memory_bandwidth_gbs=60, bf16_tflops=1.0),
)}


_HF_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
              "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def model_from_hf_config(config: dict[str, Any], *, name: str, path: str = "",
                         dtype: Optional[str] = None) -> ModelSpec:
    """A :class:`ModelSpec` from a parsed HF ``config.json``; every missing field is reported at once."""
    # Multimodal and some newer configs nest the language model's fields.
    cfg = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
    problems: list[ConfigProblem] = []

    def need(*keys: str) -> int:
        for key in keys:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return int(cfg[key])
        problems.append(ConfigProblem(f"model.path:{keys[0]}", cfg.get(keys[0]),
                                      "missing or not a positive integer in config.json"))
        return 1

    layers = need("num_hidden_layers", "n_layer", "num_layers")
    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head")
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = need("vocab_size")
    ctx = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("seq_length") or 4096)
    raw_dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    resolved = _HF_DTYPES.get(str(raw_dtype).lower())
    if resolved is None:
        problems.append(ConfigProblem("model.dtype", raw_dtype, "unknown dtype", "model.dtype=bfloat16"))
        resolved = "bfloat16"
    if problems:
        raise ConfigError(problems)
    tie = bool(cfg.get("tie_word_embeddings", False))
    params = estimate_params(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                             head_dim=head_dim, intermediate_size=inter, vocab_size=vocab,
                             tie_word_embeddings=tie, qkv_bias=bool(cfg.get("attention_bias") or
                                                                    cfg.get("model_type") == "qwen2"))
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                     head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, num_params=params,
                     max_position_embeddings=ctx, dtype=resolved, tie_word_embeddings=tie,  # type: ignore[arg-type]
                     path=path)
